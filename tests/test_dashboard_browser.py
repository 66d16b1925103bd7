"""The real dashboard in a real browser while the real scorer processes a stream.

`fraud-nb dashboard` runs as a subprocess on a free port; a champion is registered; `fraud-nb score` and
`fraud-nb labels` run as subprocesses and `fraud-nb produce` replays synthetic transactions with delayed
labels. Playwright drives Debian's Chromium (`make browser` installs it; never a downloaded browser).
The test checks that the page loads, that its figures match the database (within the refresh lag while the
stream runs, exactly once it has been drained), that they change over time, and that the page's kernel
goes away with the page. A screenshot is kept in test-artifacts/dashboard.png."""
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from fraud_nb import db
from conftest import ARTIFACTS, fraud_nb_cmd, service_env
from test_dashboard import start_dashboard, stop_dashboard, _kernels

CHROMIUM = '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync']
N, RATE = 4000, 150.0

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason='Debian chromium missing: run `make browser`')]


class DbSampler(threading.Thread):
    "Samples the database's totals every 0.2 s, so a figure read from the page can be placed in time."
    def __init__(self, url):
        super().__init__(daemon=True)
        self.engine, self.samples, self.stop = db.make_engine(url), [], threading.Event()

    def totals(self):
        with self.engine.connect() as c:
            return c.execute(sa.text('SELECT coalesce(sum(n), 0)::bigint, coalesce(sum(flagged), 0)::bigint FROM scored_rollup')).one()

    def run(self):
        while not self.stop.is_set():
            n, f = self.totals()
            self.samples.append((time.monotonic(), n, f))
            time.sleep(0.2)

    def between(self, t0, t1):
        "The smallest and largest total seen in [t0, t1]."
        ns = [n for t, n, _ in self.samples if t0 <= t <= t1]
        return min(ns), max(ns)


def _value(page, testid) -> str | None:
    return page.get_attribute(f'[data-testid="{testid}"]', 'data-value')


def _spawn(settings, *args, log):
    return subprocess.Popen(fraud_nb_cmd(*args), env=service_env(settings), stdout=open(log, 'wb'), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try: p.wait(30)
        except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait(10)


def test_dashboard_in_a_browser_while_a_stream_is_scored(settings, tmp_path):
    from playwright.sync_api import sync_playwright
    from scorer_helpers import train_champion
    settings = replace(settings, stats_interval_s=1.0, label_delay_s=2.0, retrain_min_labels=3000)
    version = train_champion(settings)
    logs = tmp_path/'logs'; logs.mkdir()
    procs, dash, sampler = [], None, DbSampler(settings.database_url)
    try:
        procs.append(_spawn(settings, 'score', '--id', 'scorer-a', log=logs/'scorer.log'))
        procs.append(_spawn(settings, 'labels', log=logs/'labels.log'))
        dash, url = start_dashboard(settings, '--orphan-timeout', '20', '--cull-interval', '2')
        sampler.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={'width': 1400, 'height': 2000})
            t0 = time.monotonic()
            page.goto(url, timeout=60_000)
            page.wait_for_selector('[data-testid="total"]', timeout=60_000)
            load_s = time.monotonic() - t0
            assert _kernels(url) == 1
            # before the stream: "no data yet", in words
            assert _value(page, 'state') == 'no-data' and _value(page, 'total') == '0'
            assert 'no data yet' in page.inner_text('[data-testid="state"]')
            producer = _spawn(settings, 'produce', '--synthetic', str(N), '--rate', str(RATE), '--label-delay', '2', log=logs/'producer.log')
            procs.append(producer)

            # while the stream runs: the figures move, and each one is a total the database really had within the refresh lag
            page.wait_for_function('() => +document.querySelector(\'[data-testid="total"]\').dataset.value > 0', timeout=90_000)
            reads = []
            for _ in range(4):
                t_read = time.monotonic()
                shown = int(_value(page, 'total'))
                time.sleep(0.5)
                lo, hi = sampler.between(t_read - 5.0, time.monotonic())
                reads.append((shown, lo, hi, page.get_attribute('img >> nth=0', 'src')))
                assert lo <= shown <= hi, f'the page shows {shown} transactions; the database had {lo}..{hi} in the seconds before'
                time.sleep(2.5)
            assert reads[-1][0] > reads[0][0], f'the total did not move while the stream ran: {reads}'
            assert len({r[3] for r in reads}) > 1, 'the throughput chart did not change while the stream ran'
            assert float(_value(page, 'tps-10s')) > 0
            assert _value(page, 'champion') == str(version)
            assert int(_value(page, 'scorers')) == 1
            assert _value(page, 'state') == 'ok'

            # after the stream: the page converges to exactly what the database says
            assert producer.wait(180) == 0, (logs/'producer.log').read_text()[-2000:]
            def drained():
                with sampler.engine.connect() as c:
                    return c.execute(sa.text('SELECT (SELECT count(*) FROM scored_transactions), (SELECT count(*) FROM labels)')).one() == (N, N)
            deadline = time.monotonic() + 120
            while not drained():
                assert time.monotonic() < deadline, 'the scorer and the label sink did not drain the stream'
                time.sleep(0.5)
            with sampler.engine.connect() as c:
                want = c.execute(sa.text('''SELECT count(*), count(*) FILTER (WHERE is_fraud), avg(probability),
                                                   (SELECT count(*) FROM labels), (SELECT count(*) FROM labels WHERE label = 1),
                                                   (SELECT count(*) FROM labels WHERE seq > (SELECT coalesce(max(label_watermark), 0) FROM retrain_runs WHERE status = 'succeeded'))
                                            FROM scored_transactions''')).one()
                rollup = c.execute(sa.text('SELECT sum(n), sum(flagged) FROM scored_rollup')).one()
                newest = set(c.execute(sa.text('''SELECT tx_id FROM scored_transactions WHERE is_fraud AND scored_at >= coalesce(
                                                      (SELECT scored_at FROM scored_transactions WHERE is_fraud ORDER BY scored_at DESC OFFSET 9 LIMIT 1), '-infinity')''')).scalars())
            assert tuple(rollup) == (want[0], want[1]), 'the scorer\'s rollup disagrees with its rows'
            page.wait_for_function(f'() => document.querySelector(\'[data-testid="total"]\').dataset.value == "{N}" && '
                                   f'document.querySelector(\'[data-testid="labeled"]\').dataset.value == "{N}"', timeout=30_000)
            time.sleep(2.5)   # one more refresh, so every figure comes from the drained database
            assert int(_value(page, 'flagged')) == want[1]
            assert float(_value(page, 'flagged-rate')) == pytest.approx(want[1] / want[0])
            assert float(_value(page, 'avg-prob')) == pytest.approx(float(want[2]))
            assert page.inner_text('[data-testid="avg-prob"]') == f'{float(want[2]):.4f}'
            assert page.inner_text('[data-testid="total"]') == f'{N:,}'
            assert int(_value(page, 'frauds')) == want[4]
            assert float(_value(page, 'confirmed-rate')) == pytest.approx(want[4] / N)
            assert int(_value(page, 'retrain')) == min(want[5], max(10 * settings.retrain_min_labels, 10_000))
            rows = [r.split('\t') for r in page.locator('[data-testid="alerts-table"] tr').all_inner_texts()[1:]]
            assert len(rows) == min(10, want[1]) and {r[0].strip() for r in rows} <= newest, (rows, newest)
            assert any(r[-1].strip() not in ('', '—') for r in rows), f'no reasons from the alerts topic: {rows}'
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS/'dashboard.png'), full_page=True)

            # the page goes away: its kernel is shut down by the page's unload call, well before the orphan culler (20 s) would
            t_close = time.monotonic()
            page.goto('about:blank'); page.close()
            while _kernels(url):
                assert time.monotonic() - t_close < 15, 'the kernel of a closed page is still running'
                time.sleep(0.25)
            server_log = ''.join(f.read_text(errors='replace') for f in tmp_path.glob('dashboard-*.log'))
            assert '204 POST /voila/api/shutdown/' in server_log, 'the unload call did not shut the kernel down'
            browser.close()
        print(f'\npage loaded in {load_s:.1f} s; totals read while streaming: {[r[:3] for r in reads]}')
    finally:
        sampler.stop.set()
        for p in procs: _stop(p)
        if dash is not None: stop_dashboard(dash)
        ARTIFACTS.mkdir(exist_ok=True)
        for f in [*logs.glob('*.log'), *tmp_path.glob('dashboard-*.log')]: shutil.copy(f, ARTIFACTS/f'dashboard-browser-{f.name}')
