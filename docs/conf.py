"Sphinx configuration of the fraud_nb documentation site (`make docs`; the sources are staged by docs/build.py)."
from configparser import ConfigParser
from pathlib import Path

_cfg = ConfigParser(delimiters=['=']); _cfg.read(Path(__file__).resolve().parents[1]/'settings.ini', encoding='utf-8')
_cfg = _cfg['DEFAULT']

project = _cfg['title']
author = _cfg['author']
copyright = _cfg['copyright']
release = version = _cfg['version']

extensions = ['myst_nb']
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3
nb_execution_mode = 'off'              # notebooks are stored clean and many cells need services: never run them here
nb_code_prompt_show = 'Show the {type}'
nb_code_prompt_hide = 'Hide the {type}'
master_doc = root_doc = 'index'
exclude_patterns = ['_build', '**.ipynb_checkpoints']
smartquotes = False                   # text as written: quotes and '...' stay as they are in the notebooks
suppress_warnings = ['myst.header']    # a symbol's doc is a level-3 heading wherever it stands
html_theme = 'furo'
html_title = f'{project} {release}'
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {'navigation_with_keys': True}
