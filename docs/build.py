"""Build the documentation site from `nbs/` and `docs/` into `_docs/` (Sphinx + MyST-NB), and the README from `nbs/index.ipynb`.

nbdev's own `nbdev_docs` needs Quarto, which does not install from the package registries, so this script keeps nbdev's
conventions for what a page shows and lets Sphinx render the pages:

- every notebook of `nbs/` becomes a page: its prose, its example cells, and the `show_doc` of each exported symbol
  (added after the export cell that defines it, as nbdev does, unless the chapter calls `show_doc` itself);
- `show_doc(...)` is rendered here from the installed package (`nbdev.showdoc`), not by executing the notebook: the
  notebooks are stored without outputs and many cells need running services;
- `#| hide` cells, `default_exp` cells and nbdev directives disappear; exported source is folded under the symbol's doc;
- the settings page gets its table from `fraud_nb.config.describe()`, so it cannot drift from the code.

Usage: `python docs/build.py` (what `make docs` runs) or `python docs/build.py readme` (what `make readme` runs).
"""
from __future__ import annotations
import ast, importlib, inspect, json, re, shutil, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS, NBS = ROOT/'docs', ROOT/'nbs'
STAGE, OUT = ROOT/'_proc'/'docs', ROOT/'_docs'
CHAPTER_MAP = '<!-- chapter map -->'       # in nbs/index.ipynb: replaced by the table of chapters
SETTINGS_TABLE = '<!-- settings table -->'  # in docs/settings.md: replaced by the table of settings
GUIDE = ['architecture', 'contracts', 'raw-events', 'tables', 'delivery', 'retraining', 'desk', 'champion-history', 'monitoring', 'scorer-monitoring', 'settings', 'operations', 'production', 'security', 'change-the-model']
NOT_PAGES = {'index'}                       # notebooks handled apart


def chapters() -> list[Path]: return sorted(NBS.glob('[0-9]*.ipynb'))
def other_notebooks() -> list[Path]: return sorted(p for p in NBS.glob('[a-z]*.ipynb') if p.stem not in NOT_PAGES)


def title_and_lead(nb_path: Path) -> tuple[str, str]:
    "The `# Title` and the `> lead` line of a notebook's first markdown cell (nbdev's front-matter convention)."
    nb = json.loads(nb_path.read_text())
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        src = ''.join(c['source'])
        t = re.search(r'^#\s+(.+)$', src, re.M)
        lead = re.search(r'^>\s*(.+)$', src, re.M)
        return (t.group(1).strip() if t else nb_path.stem), (lead.group(1).strip() if lead else '')
    return nb_path.stem, ''


def default_exp(nb_path: Path) -> str | None:
    "The module a notebook exports (`#| default_exp name`), or None."
    for c in json.loads(nb_path.read_text())['cells']:
        m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M) if c['cell_type'] == 'code' else None
        if m: return m.group(1)
    return None


def chapter_map(link=lambda p: p.name) -> str:
    "A markdown table of the chapters: notebook, module, what it is about."
    rows = ['| chapter | module | what |', '|---|---|---|']
    for p in chapters():
        title, lead = title_and_lead(p)
        mod = default_exp(p)
        rows.append(f"| [{p.stem} · {title}]({link(p)}) | {f'`fraud_nb.{mod}`' if mod else '—'} | {lead} |")
    for p in other_notebooks():
        title, lead = title_and_lead(p)
        rows.append(f'| [{p.name} · {title}]({link(p)}) | — | {lead or "notebook (not exported)"} |')
    return '\n'.join(rows)


# ---- show_doc, rendered from the installed package ------------------------------------------------------------------
_STOCK_DOC = re.compile(r'^\*(Call self as a function\.|Initialize self\.\s+See help\(type\(self\)\) for accurate signature\.)\*\s*$', re.M)
_SOURCE_LINK = re.compile(r'^\[source\]\(.*\)\{.*\}\s*$', re.M)

def render_show_doc(src: str, module: str | None) -> str | None:
    "The markdown of a `show_doc(...)` cell, rendered with nbdev.showdoc against `fraud_nb.<module>`; None if it cannot be."
    from nbdev.showdoc import show_doc
    try: call = ast.parse(src.strip()).body[0].value
    except (SyntaxError, IndexError, AttributeError): return None
    if not (isinstance(call, ast.Call) and getattr(call.func, 'id', None) == 'show_doc' and call.args): return None
    try:
        ns = dict(vars(importlib.import_module(f'fraud_nb.{module}'))) if module else {}
        obj = eval(compile(ast.Expression(call.args[0]), '<show_doc>', 'eval'), ns)
        kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except Exception as e:
        warnings.warn(f'show_doc({ast.unparse(call.args[0])}) in {module}: {e!r}; left out'); return None
    kw.setdefault('name', ast.unparse(call.args[0]))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        md = show_doc(obj, **kw)._repr_markdown_()
    md = _SOURCE_LINK.sub('', md).replace('\n---\n', '\n', 1).lstrip('-\n')
    if inspect.isclass(obj): md = md.replace('```python\ndef ', '```python\nclass ', 1)
    md = _STOCK_DOC.sub('', md)   # no docstring: say nothing rather than Python's generic text
    return md.strip() + '\n'


# ---- notebook processing (nbdev's processors where they fit) --------------------------------------------------------
_DIRECTIVE_LINE = re.compile(r'^\s*#\|.*\n?', re.M)

def process_notebook(path: Path) -> dict:
    "The page version of one notebook: hidden cells gone, show_docs rendered, exported source folded, directives stripped."
    from nbdev.process import NBProcessor, Processor
    from nbdev.processors import add_show_docs, mv_exports, hide_line, rm_header_dash
    module = default_exp(path)
    def hide_(cell): del cell['source']
    def include_(cell, *args):
        if args and args[0] == 'false': del cell['source']
    def echo_(cell, *args):
        if args and args[0] == 'false' and not cell.get('outputs'): del cell['source']
    def default_exp_(cell, *args): del cell['source']
    class docs_before_source(Processor):
        "Put the show_doc cells that follow an export cell before it: first what a symbol is, then (folded) its code."
        def begin(self):
            cells, i = self.nb.cells, 0
            while i < len(cells):
                j = i + 1
                while j < len(cells) and getattr(cells[j], 'has_sd', False): j += 1
                if j > i + 1 and cells[i].cell_type == 'code' and {'export', 'exporti'} & set(cells[i].directives_ or {}):
                    cells[i:j] = cells[i+1:j] + [cells[i]]
                i = j
    def fold_exports(cell):
        d = getattr(cell, 'directives_', {}) or {}
        if cell.cell_type == 'code' and d.keys() & {'export', 'exporti'}:
            cell.metadata.setdefault('tags', []).append('hide-input')
    def show_docs_as_markdown(cell):
        if cell.cell_type != 'code' or not re.match(r'\s*show_doc\(', cell.source or ''): return
        md = render_show_doc(_DIRECTIVE_LINE.sub('', cell.source), module)
        if md is None: return
        cell.cell_type, cell.source = 'markdown', md
        for k in ('outputs', 'execution_count'): cell.pop(k, None)
    def strip_directives(cell):
        if cell.cell_type == 'code': cell.source = _DIRECTIVE_LINE.sub('', cell.source).strip('\n')
        if not (cell.source or '').strip(): del cell['source']
    proc = NBProcessor(path, procs=[hide_, include_, echo_, default_exp_, add_show_docs, mv_exports, docs_before_source, hide_line,
                                    rm_header_dash, fold_exports, show_docs_as_markdown, strip_directives])
    proc.process()
    nb = proc.nb
    cells = []
    if not (nb.cells and nb.cells[0].cell_type == 'markdown' and re.match(r'#\s', nb.cells[0].source)):
        cells.append({'cell_type': 'markdown', 'metadata': {}, 'source': f'# {path.name}'})  # every page needs a title
    for c in nb.cells:
        d = {'cell_type': c.cell_type, 'metadata': {k: v for k, v in dict(c.metadata).items() if k == 'tags'},
             'source': c.source}
        if c.cell_type == 'code': d.update(outputs=[dict(o) for o in c.get('outputs', [])], execution_count=None)
        cells.append(d)
    for i, c in enumerate(cells): c['id'] = f'c{i}'
    return {'cells': cells, 'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
            'nbformat': 4, 'nbformat_minor': 5}


# ---- links: sources link as they sit in the repository; pages sit side by side in the site ----------------------------
def site_links(md: str) -> str:
    md = re.sub(r'\]\(\.\./nbs/([^)#]+\.ipynb)', r'](\1', md)   # docs/*.md -> a chapter
    md = re.sub(r'\]\(\.\./docs/([^)]+)\)', r'](\1)', md)       # nbs/index.ipynb -> a guide page or image
    return md

def readme_links(md: str) -> str:
    md = re.sub(r'\]\(\.\./docs/([^)]+)\)', r'](docs/\1)', md)
    md = re.sub(r'\]\((?!https?:|#|docs/|\.\./)([^)]+\.ipynb)', r'](nbs/\1', md)
    return md


def index_cells() -> list[dict]:
    "The visible markdown of nbs/index.ipynb with the chapter map filled in (links as in nbs/)."
    nb = process_notebook(NBS/'index.ipynb')
    for c in nb['cells']:
        if c['cell_type'] == 'markdown' and CHAPTER_MAP in c['source']:
            c['source'] = c['source'].replace(CHAPTER_MAP, chapter_map())
    return nb


def toctree(caption: str, entries: list[str]) -> dict:
    body = '\n'.join(entries)
    return {'cell_type': 'markdown', 'id': f'toc-{caption.lower()}', 'metadata': {}, 'source': f'```{{toctree}}\n:caption: {caption}\n:hidden:\n:maxdepth: 1\n\n{body}\n```\n'}


def stage() -> list[str]:
    "Write the Sphinx source tree into _proc/docs/; return the warnings of the processing."
    if STAGE.exists(): shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    caught = []
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        for p in DOCS.iterdir():
            if p.suffix == '.md':
                text = site_links(p.read_text())
                if SETTINGS_TABLE in text: text = text.replace(SETTINGS_TABLE, settings_table())
                (STAGE/p.name).write_text(text)
            elif p.suffix in ('.png', '.svg', '.jpg'): shutil.copy(p, STAGE/p.name)
        for p in chapters() + other_notebooks():
            nb = process_notebook(p)
            for c in nb['cells']:
                if c['cell_type'] == 'markdown': c['source'] = site_links(c['source'])
            (STAGE/p.name).write_text(json.dumps(nb, indent=1))
        nb = index_cells()
        for c in nb['cells']:
            if c['cell_type'] == 'markdown': c['source'] = site_links(c['source'])
        nb['cells'] += [toctree('Guide', [g for g in GUIDE if (DOCS/f'{g}.md').exists()]),
                        toctree('Chapters', [p.stem for p in chapters()]),
                        toctree('Notebooks', [p.stem for p in other_notebooks()])]
        (STAGE/'index.ipynb').write_text(json.dumps(nb, indent=1))
        caught = [str(w.message) for w in ws if 'show_doc' in str(w.message)]
    return caught


def settings_table() -> str:
    from fraud_nb.config import Settings, describe
    esc = lambda s: str(s).replace('|', '\\|')
    rows = ['| variable | default | what |', '|---|---|---|']
    rows += [f"| `{d['variable']}` | `{esc(d['value'])}` | {esc(d['help'])} |" if d['value'] != '' else
             f"| `{d['variable']}` | (empty) | {esc(d['help'])} |" for d in describe(Settings())]
    return '\n'.join(rows)


def build(quiet: bool = True) -> int:
    "Stage the sources and run Sphinx into _docs/; return Sphinx's exit code."
    from sphinx.cmd.build import build_main
    t0 = time.time()
    for w in stage(): print(f'docs: warning: {w}', file=sys.stderr)
    html = STAGE.parent/'build'/'html'   # MyST-NB writes beside the output folder: keep it all under _proc/
    if html.exists(): shutil.rmtree(html)
    rc = build_main(['-b', 'html', '-j', 'auto', '-c', str(DOCS), '-d', str(STAGE.parent/'build'/'doctrees'), *(['-q'] if quiet else []),
                     str(STAGE), str(html)])
    if rc == 0:
        if OUT.exists(): shutil.rmtree(OUT)
        shutil.move(html, OUT)
        print(f'docs: built {OUT.relative_to(ROOT)}/index.html in {time.time() - t0:.1f} s')
    return rc


def readme() -> str:
    "README.md, generated from nbs/index.ipynb: the same text as the site's home page, links made relative to the root."
    nb = index_cells()
    parts = []
    for c in nb['cells']:
        if c['cell_type'] == 'markdown': parts.append(c['source'].strip())
        elif 'hide-input' not in c['metadata'].get('tags', []): parts.append(f"```python\n{c['source'].strip()}\n```")
    head = '<!-- Generated from nbs/index.ipynb by `make readme` (also run by `make export`): edit the notebook, not this file. -->'
    return head + '\n\n' + readme_links('\n\n'.join(parts)) + '\n'


if __name__ == '__main__':
    if sys.argv[1:] == ['readme']: (ROOT/'README.md').write_text(readme()); print('README.md written from nbs/index.ipynb')
    elif sys.argv[1:] == ['--check-readme']:
        ok = (ROOT/'README.md').read_text() == readme()
        print('README.md is up to date' if ok else 'README.md differs from nbs/index.ipynb: run `make readme`'); sys.exit(0 if ok else 1)
    else: sys.exit(build(quiet='-v' not in sys.argv))
