"""The real dashboard in a real browser while the real scorer processes a stream.

`fraud-nb dashboard` runs as a subprocess on a free port; a champion is registered; `fraud-nb score` and
`fraud-nb labels` run as subprocesses and `fraud-nb produce` replays synthetic transactions with delayed
labels. Playwright drives Debian's Chromium (`make browser` installs it; never a downloaded browser).
The test checks that the page loads, that its figures match the database (while the stream runs: the page catches
up with what the database had and never shows more than it has; exactly once the stream has been drained), that
they change over time, and that the page's kernel goes away with the page. Every wait is on a condition (a value
appears, a count changes), with a timeout. A screenshot is kept in test-artifacts/dashboard.png."""
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from fraud_nb import db
from conftest import ARTIFACTS, fraud_nb_cmd, service_env
from fraud_nb.procs import wait_until
from test_dashboard import start_dashboard, stop_dashboard, _kernels

CHROMIUM = '/usr/bin/chromium'
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync']
N, RATE = 4000, 150.0

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason='Debian chromium missing: run `make browser`')]


def _db_one(engine, sql: str):
    with engine.connect() as c: return c.execute(sa.text(sql)).one()


def _db_total(engine) -> int:
    return _db_one(engine, 'SELECT coalesce(sum(n), 0)::bigint FROM scored_rollup')[0]


def _js_value(testid: str) -> str:
    "The JavaScript expression of a figure's raw value (a number), for page.wait_for_function."
    return f'+document.querySelector(\'[data-testid="{testid}"]\').dataset.value'


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
    procs, dash, engine = [], None, db.make_engine(settings.database_url)
    try:
        procs.append(_spawn(settings, 'score', '--id', 'scorer-a', log=logs/'scorer.log'))
        procs.append(_spawn(settings, 'labels', log=logs/'labels.log'))
        dash, url = start_dashboard(settings, '--orphan-timeout', '20', '--cull-interval', '2')
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

            # while the stream runs: the page catches up with what the database had a moment before, never shows more than the
            # database has (its total only grows), and moves on while rows keep arriving
            page.wait_for_function(f'() => {_js_value("total")} > 0', timeout=90_000)
            page.wait_for_function(f'() => {_js_value("tps-10s")} > 0', timeout=30_000)
            chart = page.get_attribute('img >> nth=0', 'src')
            reads = []
            for _ in range(3):
                had = _db_total(engine)
                page.wait_for_function(f'() => {_js_value("total")} >= {had}', timeout=30_000)
                shown = int(_value(page, 'total'))
                has = _db_total(engine)
                assert had <= shown <= has, f'the page shows {shown} transactions; the database had {had}, then {has}'
                reads.append((had, shown, has))
                if has < N: page.wait_for_function(f'() => {_js_value("total")} > {shown}', timeout=30_000)
            assert reads[0][1] < N and reads[-1][1] > reads[0][1], f'the total did not move while the stream ran: {reads}'
            page.wait_for_function(f'() => document.querySelector("img").getAttribute("src") != {json.dumps(chart)}', timeout=30_000)  # the chart moved
            page.wait_for_function(f'() => document.querySelector(\'[data-testid="champion"]\').dataset.value == "{version}"', timeout=60_000)
            # the champion was trained offline without test figures: no figures without context; the stream is prefeaturized
            page.wait_for_selector('[data-testid="champion-evidence"][data-value="none"]', timeout=30_000)
            assert 'no holdout evidence' in page.inner_text('[data-testid="champion-evidence"]')
            assert _value(page, 'feature-set') == 'prefeaturized' and _value(page, 'stream') == 'prefeaturized'
            page.wait_for_function(f'() => {_js_value("scorers")} == 1 && '
                                   f'document.querySelector(\'[data-testid="state"]\').dataset.value == "ok"', timeout=30_000)

            # after the stream: the page converges to exactly what the database says
            assert producer.wait(180) == 0, (logs/'producer.log').read_text()[-2000:]
            wait_until(lambda: tuple(_db_one(engine, 'SELECT (SELECT count(*) FROM scored_transactions), (SELECT count(*) FROM labels)')) == (N, N),
                       120, 'the scorer and the label sink draining the stream', interval=0.5)
            want = _db_one(engine, '''SELECT count(*), count(*) FILTER (WHERE is_fraud), avg(probability),
                                            (SELECT count(*) FROM labels), (SELECT count(*) FROM labels WHERE label = 1),
                                            (SELECT count(*) FROM labels WHERE seq > (SELECT coalesce(max(label_watermark), 0) FROM retrain_runs WHERE status = 'succeeded')),
                                            to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
                                     FROM scored_transactions''')
            rollup = _db_one(engine, 'SELECT sum(n), sum(flagged) FROM scored_rollup')
            newest = set(_db_one(engine, '''SELECT array_agg(tx_id) FROM scored_transactions WHERE is_fraud AND scored_at >= coalesce(
                                                (SELECT scored_at FROM scored_transactions WHERE is_fraud ORDER BY scored_at DESC OFFSET 9 LIMIT 1),
                                                '-infinity')''')[0] or [])   # the ten newest alerts, and any that tie with the tenth
            assert tuple(rollup) == (want[0], want[1]), 'the scorer\'s rollup disagrees with its rows'
            # a refresh that started after the drain (the page's time, from the database's clock, is later than the drain's)
            page.wait_for_function(f'() => document.querySelector(\'[data-testid="updated"]\').textContent > "updated {want[6]} UTC"', timeout=30_000)
            # the label total is counted incrementally: give it the refreshes it needs to converge (bounded)
            page.wait_for_function(f'() => document.querySelector(\'[data-testid="labeled"]\').dataset.value == "{N}"', timeout=30_000)
            assert int(_value(page, 'total')) == N and int(_value(page, 'labeled')) == N
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
            # the reasons come from the alerts topic, read by the page without blocking: they show within a few refreshes
            page.wait_for_function('''() => [...document.querySelectorAll('[data-testid="alerts-table"] tr td:last-child')]
                                              .some(td => !['', '—'].includes(td.textContent.trim()))''', timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS/'dashboard.png'), full_page=True)

            # the page goes away: its kernel is shut down by the page's unload call, well before the orphan culler (20 s) would
            page.goto('about:blank'); page.close()
            wait_until(lambda: _kernels(url) == 0, 15, 'the kernel of the closed page shut down', interval=0.25)
            server_log = ''.join(f.read_text(errors='replace') for f in tmp_path.glob('dashboard-*.log'))
            assert '204 POST /voila/api/shutdown/' in server_log, 'the unload call did not shut the kernel down'
            browser.close()
        print(f'\npage loaded in {load_s:.1f} s; totals while streaming (database before, page, database after): {reads}')
    finally:
        for p in procs: _stop(p)
        if dash is not None: stop_dashboard(dash)
        engine.dispose()
        ARTIFACTS.mkdir(exist_ok=True)
        for f in [*logs.glob('*.log'), *tmp_path.glob('dashboard-*.log')]: shutil.copy(f, ARTIFACTS/f'dashboard-browser-{f.name}')


def test_dashboard_shows_drift_and_quality_per_version(settings):
    "Drifted transactions in the champion's rollup: the page shows the drift banner naming them, the drift table worst first, and the desk link."
    from playwright.sync_api import sync_playwright
    from fraud_nb.data import synthetic_transactions
    from fraud_nb.monitor import drift_transactions, DRIFTED_V
    from test_monitor import champion_with_reference, write_rollup
    version, model, ref = champion_with_reference(settings)
    engine = db.make_engine(settings.database_url)
    dash = None
    try:
        write_rollup(engine, version, model, ref, drift_transactions(synthetic_transactions(3000, seed=8, fraud_rate=0.01)))
        dash, url = start_dashboard(settings, '--orphan-timeout', '20', '--cull-interval', '2')
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={'width': 1400, 'height': 2000})
            page.goto(url, timeout=60_000)
            page.wait_for_selector('[data-testid="drift-banner"]', timeout=90_000)
            named = set(_value(page, 'drift-banner').split(','))
            assert {'log_amount', *DRIFTED_V} <= named, named
            assert f'version {version}' in page.inner_text('[data-testid="drift-banner"]')
            rows = [r.split('\t') for r in page.locator('[data-testid="drift-table"] tr').all_inner_texts()[1:]]
            assert len(rows) == len(model.features) + 1            # every feature and the score
            verdicts = [r[3].strip() for r in rows[:-1]]
            assert verdicts[:len(named - {'__score__'})] == ['drifted'] * len(named - {'__score__'}), rows   # worst first
            assert page.get_attribute('[data-testid="desk-link"]', 'href').endswith('/desk')
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS/'dashboard-drift.png'), full_page=True)
            page.goto('about:blank'); page.close(); browser.close()
    finally:
        if dash is not None: stop_dashboard(dash)
        engine.dispose()
