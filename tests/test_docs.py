"""The documentation site (`make docs`, which `make test` runs before pytest) and the README generated from nbs/index.ipynb."""
import html, importlib.util, json, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT/'_docs'
GUIDE = ['architecture', 'contracts', 'raw-events', 'tables', 'delivery', 'retraining', 'desk', 'champion-history', 'monitoring', 'scorer-monitoring', 'settings', 'operations', 'production', 'security', 'change-the-model']

_spec = importlib.util.spec_from_file_location('fraud_nb_docs_build', ROOT/'docs'/'build.py')
build = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(build)


@pytest.fixture(scope='module')
def site():
    "The built site; built here when `make docs` has not run (pytest alone on a fresh clone)."
    if not (SITE/'index.html').exists():
        r = subprocess.run([sys.executable, 'docs/build.py'], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return SITE


def text(page: Path) -> str:
    "The visible text of an HTML page, whitespace collapsed."
    body = re.sub(r'(?s)<(script|style)\b.*?</\1>', ' ', page.read_text())
    body = re.sub(r'</?(span|code|a|em|strong|b|i)\b[^>]*>', '', body)   # inline markup: no word break
    return re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', ' ', body)))


def norm(s: str) -> str:
    "Markdown source as it reads on a page: no backticks, whitespace collapsed."
    return re.sub(r'\s+', ' ', s.replace('`', '')).strip()


def test_home_page_says_what_fraud_nb_is_and_maps_every_chapter(site):
    page = text(site/'index.html')
    assert 'Real-time credit-card fraud detection that data scientists run from notebooks' in page
    assert 'make demo' in page and 'make test' in page
    raw = (site/'index.html').read_text()
    for nb in build.chapters():
        title, lead = build.title_and_lead(nb)
        assert f'href="{nb.stem}.html"' in raw, f'the home page does not link {nb.name}'
        assert norm(title) in page


@pytest.mark.parametrize('nb', build.chapters() + build.other_notebooks(), ids=lambda p: p.stem)
def test_a_page_per_notebook_with_its_prose(site, nb):
    page = site/f'{nb.stem}.html'
    assert page.exists(), f'no page for {nb.name}'
    t = text(page)
    title, lead = build.title_and_lead(nb)
    assert norm(title) in t
    if lead: assert norm(lead) in t
    for pre in re.findall(r'(?s)<pre\b.*?</pre>', page.read_text()):
        code = html.unescape(re.sub(r'<[^>]+>', '', pre))
        assert not re.search(r'^\s*#\|', code, re.M), f'an nbdev directive shows in the code of {page.name}: {code[:200]}'
    # the first paragraph of prose after the title is on the page too
    cells = json.loads(nb.read_text())['cells']
    prose = [c for c in cells if c['cell_type'] == 'markdown'][1:2]
    if prose:
        first = re.split(r'\n\s*\n', ''.join(prose[0]['source']).strip())[0]
        if not first.startswith(('#', '|', '!', '<', '```', '-', '>')):
            plain = re.sub(r'\*+([^*]+)\*+', r'\1', re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', first))   # links, emphasis
            words = norm(plain).split()[:8]
            assert ' '.join(words) in t, ' '.join(words)


def test_show_doc_is_rendered_from_the_package(site):
    "A chapter page shows each exported symbol's signature and docstring (nbdev's show_doc), not the call."
    from fraud_nb.config import get_settings
    t = text(site/'00_config.html')
    assert 'def get_settings(' in t
    assert norm(get_settings.__doc__) in t
    assert 'show_doc(' not in t


def test_hidden_cells_stay_hidden(site):
    for nb in build.chapters():
        for c in json.loads(nb.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and re.match(r'\s*#\|\s*hide\b', src):
                body = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith('#')]
                if body and len(body[0]) > 20:
                    assert html.escape(body[0].strip())[:60] not in (site/f'{nb.stem}.html').read_text(), (nb.name, body[0])


def test_guide_pages_exist(site):
    for g in GUIDE: assert (site/f'{g}.html').exists(), g
    c = text(site/'contracts.html')
    for topic in ('transactions', 'labels', 'fraud-alerts', 'transactions.dlq', 'labels.dlq'): assert topic in c
    assert 'ON CONFLICT (tx_id) DO NOTHING' in text(site/'delivery.html')
    assert 'REFUSED model version' in text(site/'change-the-model.html')


def test_settings_page_is_generated_from_the_code(site):
    from fraud_nb.config import Settings, describe
    t = text(site/'settings.html')
    for d in describe(Settings()):
        assert d['variable'] in t and norm(d['help']) in t, d['variable']


def test_readme_is_generated_from_the_home_page():
    assert (ROOT/'README.md').read_text() == build.readme(), 'README.md differs from nbs/index.ipynb: run `make readme`'


def test_docs_refer_to_nothing_outside_the_repository():
    for p in [*(ROOT/'docs').glob('*.md'), ROOT/'nbs'/'index.ipynb', ROOT/'data'/'README.md']:
        assert 'shared/' not in p.read_text(), p
