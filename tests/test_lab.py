"""`fraud-nb lab` against the test session's embedded stack, opened in headless Chromium."""
import json, os, queue, re, signal, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path

import psutil
import pytest

from fraud_nb.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync']


def _lines(proc) -> queue.Queue:
    "The process's output lines, read by a thread so that waits stay bounded."
    q = queue.Queue()
    def pump():
        for line in proc.stdout: q.put(line)
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_line(q: queue.Queue, pattern: str, timeout: float, seen: list) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try: line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty: break
        if line is None: break
        seen.append(line)
        m = re.search(pattern, line)
        if m: return m
    raise AssertionError(f'no line matching {pattern!r} within {timeout} s; output:\n{"".join(seen)}')


def _get(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={'Authorization': f'token {token}'} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r: return r.status, json.loads(r.read() or b'null')


@pytest.fixture
def lab(stack):
    "`python -m fraud_nb.lab` on a free port, wired to the session's stack; stopped (SIGTERM) at the end."
    port = free_port()
    env = {**os.environ, 'FRAUD_NB_STATE_DIR': str(stack.dir), 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen([sys.executable, '-m', 'fraud_nb.lab', '--port', str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    out, seen = _lines(proc), []
    try:
        m = _wait_line(out, r'open: (http://127\.0\.0\.1:(\d+)/lab\?token=(\S+))', 120, seen)
        yield dict(proc=proc, url=m.group(1), port=int(m.group(2)), token=m.group(3), out=out, seen=seen, stack=stack)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try: proc.wait(30)
            except subprocess.TimeoutExpired: proc.kill(); proc.wait(10)


@pytest.mark.browser
def test_lab_opens_in_chromium_with_the_notebooks(lab):
    from playwright.sync_api import sync_playwright
    base = f'http://127.0.0.1:{lab["port"]}'
    assert lab['port'] and len(lab['token']) >= 32

    # The API answers the token and nothing else.
    with pytest.raises(urllib.error.HTTPError) as e: _get(f'{base}/api/status')
    assert e.value.code == 403
    assert _get(f'{base}/api/status', lab['token'])[0] == 200

    # The default kernel is this environment's python3, and the server (whose environment kernels inherit)
    # carries the settings of the running stack.
    _, specs = _get(f'{base}/api/kernelspecs', lab['token'])
    assert specs['default'] == 'python3'
    exe = specs['kernelspecs']['python3']['spec']['argv'][0]
    assert Path(exe).resolve().parent == Path(sys.executable).resolve().parent, exe
    server = [p for p in psutil.Process(lab['proc'].pid).children(recursive=True) if 'jupyterlab' in ' '.join(p.cmdline())]
    assert len(server) == 1
    env = server[0].environ()
    assert env['FRAUD_NB_DATABASE_URL'] == lab['stack'].service_settings().database_url
    assert env['FRAUD_NB_KAFKA_BOOTSTRAP'] == lab['stack'].service_settings().kafka_bootstrap
    assert Path(env['FRAUD_NB_STATE_DIR']).is_absolute() and 'JUPYTER_TOKEN' not in env
    assert not list((lab['stack'].dir/'lab').glob('token-*')), 'the token file must be gone once the server has read it'

    # Real Chromium, with the printed URL: the file browser lists the notebooks of nbs/.
    expected = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            page.goto(lab['url'], timeout=60_000)
            listing = page.locator('.jp-DirListing-content')
            for name in expected:   # each one shown in the listing (scrolled into view if the list is long)
                item = listing.locator('.jp-DirListing-item', has=page.locator('.jp-DirListing-itemText', has_text=re.compile(f'^{re.escape(name)}$')))
                item.first.scroll_into_view_if_needed(timeout=60_000)
                assert item.first.is_visible(), name
            listed = {t.strip() for t in listing.locator('.jp-DirListing-itemText').all_text_contents()}
            assert set(expected) <= listed, set(expected) - listed
            page.locator('.jp-DirListing-item').first.scroll_into_view_if_needed()
            (ROOT/'test-artifacts').mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT/'test-artifacts'/'lab.png'))
        finally:
            browser.close()

    # The token is in the printed URL and nowhere in JupyterLab's log.
    log = (lab['stack'].dir/'logs'/'lab.log').read_text()
    assert lab['token'] not in log

    # SIGTERM stops JupyterLab cleanly: exit code 0, the server process gone, the port free again.
    lab['proc'].send_signal(signal.SIGTERM)
    assert lab['proc'].wait(30) == 0
    psutil.wait_procs(server, timeout=30)
    assert not server[0].is_running() or server[0].status() == psutil.STATUS_ZOMBIE
    with pytest.raises(urllib.error.URLError): _get(f'{base}/api/status', lab['token'])


def test_lab_refuses_a_missing_folder_in_one_line(stack, tmp_path):
    env = {**os.environ, 'FRAUD_NB_STATE_DIR': str(stack.dir)}
    r = subprocess.run([sys.executable, '-m', 'fraud_nb.lab', '--dir', str(tmp_path/'missing'), '--port', str(free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f'fraud-nb lab: no notebook folder {tmp_path/"missing"}: run from the repository root or give --dir']
