"Packaging for fraud_nb, driven by nbdev's settings.ini (nbdev 2 layout)."
from configparser import ConfigParser

import setuptools
from packaging.version import Version  # pkg_resources is gone from current setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

for key in 'version description keywords author author_email lib_name min_python'.split():
    assert key in cfg, f'settings.ini lacks {key!r}'
Version(cfg['version'])  # fail early on a malformed version

def _reqs(key): return cfg.get(key, '').split()

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['fraud_nb', 'fraud_nb.*']),
    include_package_data=True,
    python_requires=f">={cfg['min_python']}",
    install_requires=_reqs('requirements'),
    extras_require={'dev': _reqs('dev_requirements'),
                    'test': _reqs('test_requirements'),
                    'docs': _reqs('docs_requirements'),   # the documentation site: `make docs`
                    'all': _reqs('dev_requirements') + _reqs('test_requirements') + _reqs('docs_requirements')},
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
