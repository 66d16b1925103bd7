"""Issue 13's demo measurement: run `fraud-nb up --demo` for N minutes on a stack of its own, then read from the
database what retraining did and what it cost the scorer.

    .venv/bin/python benchmarks/demo_retraining.py --minutes 10 [--json] [--keep DIR]

It starts the embedded demo stack (simulated raw events at the demo's rate, labels after the demo's delay, the
retrainer at the demo's threshold) in a temporary state directory with free ports, waits `--minutes` after `up`
returned (plus, bounded by `--finish-s`, until a run in progress ends), prints the figures, and stops the stack with
`fraud-nb down`. Figures (all read from PostgreSQL, the queries are printed with `--sql`):

- every retraining run: trigger, status, duration, decision, holdout frauds, confidence, challenger AP, verdict;
- promotions: each must carry >= 30 holdout frauds and a confidence statement; runs whose challenger AP >= 0.999;
- the scorer's latency per minute of scoring time (p50/p99 of `scored_transactions.latency_ms`), for the minutes
  that overlap a run in progress and for the others: median and max of the per-minute p99;
- whether the stream's event times start after the first champion's training data ends;
- the machine's load average (the machine may be shared: say so when quoting the figures).
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS_SQL = """SELECT run_id, trigger, status, decision, started_at, coalesce(finished_at, now()) AS until, duration_s, error,
                     evidence->>'holdout_frauds' AS holdout_frauds, evidence->>'confidence' AS confidence,
                     evidence->>'verdict' AS verdict, (challenger_metrics->>'average_precision')::float8 AS challenger_ap,
                     (champion_metrics->>'average_precision')::float8 AS champion_ap
              FROM retrain_runs ORDER BY started_at"""
MINUTES_SQL = """SELECT date_trunc('minute', scored_at) AS minute, count(*) AS n,
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99
                 FROM scored_transactions WHERE scored_at >= :t0 GROUP BY 1 ORDER BY 1"""
STREAM_SQL = "SELECT min(event_time), max(event_time), count(*) FROM scored_transactions"


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def fraud_nb(*args, env, cwd, timeout=900, check=True):
    p = subprocess.run([sys.executable, '-m', 'fraud_nb.cli', *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0: raise SystemExit(f'fraud-nb {" ".join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def median(xs):
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def measure(settings, t0) -> dict:
    import sqlalchemy as sa
    from fraud_nb import db, registry
    eng = db.make_engine(settings.database_url)
    with eng.connect() as c:
        runs = [dict(r._mapping) for r in c.execute(sa.text(RUNS_SQL))]
        minutes = [dict(r._mapping) for r in c.execute(sa.text(MINUTES_SQL), {'t0': t0})]
        first, last, n = c.execute(sa.text(STREAM_SQL)).one()
    eng.dispose()
    busy = lambda m: any(r['started_at'] < m['minute'] + _minute() and r['until'] > m['minute'] for r in runs)
    during = [m for m in minutes if busy(m)]
    outside = [m for m in minutes if not busy(m)]
    promos = [r for r in runs if r['decision'] == 'promoted']
    first_champion = {}
    try:   # the first champion's data: its `data` tag names the dataset; its clock ends where the stream should begin
        from fraud_nb.data import DatasetSource
        client = registry.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
        versions = sorted(client.search_model_versions(f"name='{settings.model_name}'"), key=lambda v: int(v.version))
        tag = versions[0].tags.get('data') if versions else None
        h = DatasetSource.from_tag(tag).load('all') if tag else None
        first_champion = dict(version=versions[0].version if versions else None, data=tag,
                              data_ends=str(h.event_time.max()) if h is not None and 'event_time' in h else None)
        if first is not None and first_champion['data_ends']:
            first_champion['stream_starts_after_its_data'] = bool(first > h.event_time.max())
    except Exception as e: first_champion['error'] = f'{type(e).__name__}: {e}'
    p99 = lambda ms: dict(minutes=len(ms), median_p99_ms=median([m['p99'] for m in ms]), max_p99_ms=max((m['p99'] for m in ms), default=None),
                          median_p50_ms=median([m['p50'] for m in ms]), tx=sum(m['n'] for m in ms))
    return dict(
        runs=[{k: (str(v) if k in ('started_at', 'until') else v) for k, v in r.items()} for r in runs],
        promotions=len(promos),
        promotions_with_30_frauds_and_confidence=sum(1 for r in promos if (int(r['holdout_frauds'] or 0) >= 30 and r['confidence'] and r['verdict'])),
        runs_with_challenger_ap_ge_0_999=sum(1 for r in runs if (r['challenger_ap'] or 0) >= 0.999),
        latency_during_runs=p99(during), latency_outside_runs=p99(outside),
        minutes_during_runs_over_100ms=[str(m['minute']) for m in during if m['p99'] > 100],
        stream=dict(first_event=str(first), last_event=str(last), scored=n), first_champion=first_champion,
        per_minute=[dict(minute=str(m['minute']), n=m['n'], p50=round(m['p50'], 1), p99=round(m['p99'], 1), during_run=busy(m)) for m in minutes])


def running(settings) -> int:
    import sqlalchemy as sa
    from fraud_nb import db
    eng = db.make_engine(settings.database_url)
    with eng.connect() as c: n = c.execute(sa.text("SELECT count(*) FROM retrain_runs WHERE status = 'running'")).scalar()
    eng.dispose(); return n


def _minute():
    from datetime import timedelta
    return timedelta(minutes=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--minutes', type=float, default=10.0, help='how long the demo runs after `up` returned')
    ap.add_argument('--finish-s', type=float, default=300.0, help='then at most this long for a run in progress to finish')
    ap.add_argument('--keep', help='keep the stack state in this directory (default: a temporary one, removed)')
    ap.add_argument('--json', action='store_true', help='print the figures as JSON')
    ap.add_argument('--sql', action='store_true', help='print the queries that read the figures')
    a = ap.parse_args(argv)
    from fraud_nb.config import get_settings, read_stack_file, with_stack_endpoints
    work = Path(a.keep or tempfile.mkdtemp(prefix='demo-retraining-')).absolute(); work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith('FRAUD_NB_')}
    env.update(FRAUD_NB_STATE_DIR=str(work/'state'), FRAUD_NB_DASHBOARD_PORT=str(free_port()), FRAUD_NB_MLFLOW_UI_PORT=str(free_port()),
               FRAUD_NB_REPORTS_DIR=str(work/'reports'), PYTHONUNBUFFERED='1')
    load0, t_up = os.getloadavg(), time.monotonic()
    print(f'starting the demo stack in {work} (load average {load0[0]:.1f}) ...', file=sys.stderr, flush=True)
    try:
        up = fraud_nb('up', '--demo', env=env, cwd=work, timeout=1200)
        print(up.stdout[-1500:], file=sys.stderr)
        up_s = time.monotonic() - t_up
        settings = with_stack_endpoints(get_settings(env), read_stack_file(work/'state'), override=True)
        from datetime import datetime, timezone
        t0 = datetime.now(timezone.utc)
        end = time.monotonic() + a.minutes * 60
        loads = []
        while time.monotonic() < end:
            time.sleep(min(30, max(0.0, end - time.monotonic()))); loads.append(os.getloadavg()[0])
            print(f'{(a.minutes * 60 - (end - time.monotonic())) / 60:.1f} min, load {loads[-1]:.1f}', file=sys.stderr, flush=True)
        finish = time.monotonic() + a.finish_s
        while time.monotonic() < finish and running(settings): time.sleep(5)
        out = measure(settings, t0)
        out.update(minutes=a.minutes, up_s=round(up_s, 1), load_average_start=round(load0[0], 2),
                   load_average_median=median(loads), load_average_end=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
    finally:
        down = fraud_nb('down', env=env, cwd=work, timeout=300, check=False)
        print(down.stdout[-800:], file=sys.stderr)
        if not a.keep: shutil.rmtree(work, ignore_errors=True)
    if a.json: print(json.dumps(out, indent=1, default=str)); return 0
    print(f"demo {a.minutes:g} min after up ({out['up_s']:.0f} s to start), {out['cpus']} cores, load average "
          f"{out['load_average_start']} at start, median {out['load_average_median']}, {out['load_average_end']} at end")
    print(f"stream: scored {out['stream']['scored']:,} transactions, event times {out['stream']['first_event']} .. {out['stream']['last_event']}; "
          f"first champion: {out['first_champion']}")
    for r in out['runs']:
        print(f"run {r['run_id']} {r['trigger']} {r['status']} {r['decision'] or '-'} {r['duration_s'] or 0:.0f} s, holdout frauds "
              f"{r['holdout_frauds']}, confidence {r['confidence']}, challenger AP {r['challenger_ap']}: {(r['verdict'] or r['error'] or '')[:160]}")
    print(f"promotions {out['promotions']}, of which with >= 30 holdout frauds and a confidence statement: "
          f"{out['promotions_with_30_frauds_and_confidence']}; runs with challenger AP >= 0.999: {out['runs_with_challenger_ap_ge_0_999']}")
    for k in ('latency_during_runs', 'latency_outside_runs'):
        v = out[k]
        print(f"{k}: {v['minutes']} minute(s), {v['tx']:,} tx; per-minute p99 median {v['median_p99_ms']} ms, max {v['max_p99_ms']} ms; "
              f"median p50 {v['median_p50_ms']} ms")
    print(f"minutes during runs with p99 > 100 ms: {out['minutes_during_runs_over_100ms'] or 'none'}")
    if a.sql: print('\n-- runs\n' + RUNS_SQL + '\n-- latency per minute\n' + MINUTES_SQL)
    return 0


if __name__ == '__main__':
    sys.exit(main())
