"""Stopping the retrainer (issue 18 items 4 and 6, the retrainer's side): SIGTERM (what `fraud-nb down` sends) ends a
run in progress promptly and records it as interrupted with a marked partial report; `fraud-nb retrain --now` queues
behind a running run and says what it waits for; Ctrl-C ends a manual run the same way; a `running` row left by a
retrainer killed outright is closed at the next start. Real services: `fraud-nb retrainer` and `fraud-nb retrain`
processes, papermill kernels, PostgreSQL advisory locks, the MLflow registry."""
import json
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa

from fraud_nb import db, pg, registry, retrain
from fraud_nb.data import synthetic_transactions
from conftest import service_env, fraud_nb_cmd
from scorer_helpers import wait_for
from test_retrain import champion_from, insert_labelled, runs

BIG_HISTORY = 'synthetic:150000:seed=0'   # a run that trains for a while: it is still running when the test stops it


def started_cells(report) -> int:
    "Cells papermill has started in `report` (0 while it does not exist yet): > 2 means the kernel runs the notebook."
    try: cells = json.loads(Path(report).read_text())['cells']
    except (OSError, ValueError, KeyError): return 0
    return sum(c.get('metadata', {}).get('papermill', {}).get('status') in ('running', 'completed') for c in cells)


def first_cell(report) -> str:
    return ''.join(json.loads(Path(report).read_text())['cells'][0]['source'])


def running_row(s, trigger):
    return next((r for r in runs(s) if r['status'] == 'running' and r['trigger'] == trigger), None)


def exits_within(proc, seconds) -> float:
    t0 = time.monotonic()
    proc.wait(seconds)
    return time.monotonic() - t0


def text(path) -> str:
    return Path(path).read_text(errors='replace') if Path(path).exists() else ''


def test_down_interrupts_a_run_now_queues_and_stale_runs_are_closed(settings, tmp_path):
    s = replace(settings, retrain_min_labels=300, retrain_poll_s=1.0)
    v1 = champion_from(s, synthetic_transactions(20000, seed=3), source=BIG_HISTORY)
    insert_labelled(s, synthetic_transactions(400, seed=4, fraud_rate=0.05))
    logs = {n: tmp_path/f'{n}.log' for n in ('retrainer', 'now', 'restart')}
    svc = subprocess.Popen(fraud_nb_cmd('retrainer'), env=service_env(s), stdout=open(logs['retrainer'], 'ab'),
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    now = None
    try:
        # the service starts a run on the labels; a manual run asked for meanwhile waits in line and says for what
        auto = wait_for(lambda: running_row(s, 'labels'), 120, 'the retrainer to start a run')
        wait_for(lambda: started_cells(auto['report_ipynb']) > 2, 120, 'the kernel to execute the report')
        now = subprocess.Popen(fraud_nb_cmd('retrain', '--now', '--wait-s', '300'), env=service_env(s), stdout=open(logs['now'], 'ab'),
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: f"run {auto['run_id']} (labels) is in progress since" in text(logs['now']), 60, 'retrain --now to say it waits')
        assert running_row(s, 'labels') and not running_row(s, 'manual') and now.poll() is None

        # `down` sends SIGTERM: the run ends promptly, recorded as interrupted, its partial report marked
        svc.send_signal(signal.SIGTERM)
        took = exits_within(svc, 30)
        assert svc.returncode == 0 and took < 20, (took, text(logs['retrainer']))
        [row] = [r for r in runs(s) if r['run_id'] == auto['run_id']]
        assert row['status'] == 'failed' and row['error'].startswith('interrupted by fraud-nb down'), row
        assert row['finished_at'] is not None and row['decision'] is None
        assert first_cell(row['report_ipynb']).startswith('> **Interrupted — this report is partial.** interrupted by fraud-nb down')

        # the queued manual run gets the lock next (not the retrainer, not later), and Ctrl-C ends it the same way
        manual = wait_for(lambda: running_row(s, 'manual'), 60, 'the queued manual run to start')
        assert f"run {manual['run_id']} started" in text(logs['now'])
        wait_for(lambda: started_cells(manual['report_ipynb']) > 2, 120, 'the manual run to execute its report')
        now.send_signal(signal.SIGINT)
        took = exits_within(now, 30)
        assert now.returncode == 130 and took < 20, (now.returncode, took, text(logs['now']))
        [row] = [r for r in runs(s) if r['run_id'] == manual['run_id']]
        assert row['status'] == 'failed' and row['error'].startswith('interrupted by Ctrl-C'), row
        assert 'interrupted by Ctrl-C' in text(logs['now'])
    finally:
        for p in (svc, now):
            if p is not None and p.poll() is None: p.kill(); p.wait(10)

    # nothing was registered or promoted by the interrupted runs, and the lock is free
    versions = registry.MlflowClient(s.mlflow_tracking_uri, s.mlflow_tracking_uri).search_model_versions(f"name='{s.model_name}'")
    assert [str(v.version) for v in versions] == [str(v1)] and registry.champion_version(s) == v1
    eng = db.make_engine(s.database_url)
    with eng.connect() as c:
        assert c.execute(sa.text('SELECT pg_try_advisory_lock(:k)'), {'k': pg.RETRAIN_LOCK}).scalar()
        c.execute(sa.text('SELECT pg_advisory_unlock(:k)'), {'k': pg.RETRAIN_LOCK})

    # a retrainer killed outright leaves a `running` row: the next start closes it and marks its report
    stale_report = Path(row['report_ipynb']).with_name('retrain-stale.ipynb')
    stale_report.write_text(json.dumps({'cells': [], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    with eng.begin() as c:
        c.execute(sa.text("""INSERT INTO retrain_runs (run_id, trigger, label_watermark, new_labels, status, report_ipynb)
                             VALUES ('stale001', 'labels', 0, 0, 'running', :p)"""), {'p': str(stale_report)})
    idle = replace(s, retrain_min_labels=10**9)
    again = subprocess.Popen(fraud_nb_cmd('retrainer'), env=service_env(idle), stdout=open(logs['restart'], 'ab'),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: next(r for r in runs(s) if r['run_id'] == 'stale001')['status'] != 'running', 60, 'the stale run to be closed')
        # it then renders the interrupted reports; once they are done it is idle, and an idle retrainer stops at once
        wait_for(lambda: all(r['report_html'] for r in runs(s)), 120, 'the interrupted reports to be rendered')
        again.send_signal(signal.SIGTERM)
        assert exits_within(again, 20) < 10 and again.returncode == 0
    finally:
        if again.poll() is None: again.kill(); again.wait(10)
    stale = next(r for r in runs(s) if r['run_id'] == 'stale001')
    assert stale['status'] == 'failed' and stale['error'] == retrain.STALE_ERROR and stale['finished_at'] is not None
    assert first_cell(stale_report).startswith('> **Interrupted') and 'stale001' in text(logs['restart'])
    for r in runs(s):   # the interrupted runs' reports are rendered by the next holder of the lock, banner included
        assert r['error'].startswith('interrupted') and 'this report is partial' in text(r['report_html']), r
    assert [r['status'] for r in runs(s)].count('running') == 0
    eng.dispose()
