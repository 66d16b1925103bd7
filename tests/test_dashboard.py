"""The dashboard's queries against a real PostgreSQL with hand-checkable rows, its states, and the server
(`fraud-nb dashboard`: reports, health probe, kernel cap, orphan culling).

Also home of `ScorerSim`, a stand-in writer that inserts scored rows and their rollup exactly like the
scorer's contract says (one transaction per batch, `ON CONFLICT (tx_id) DO NOTHING`, the rollup counting
only the rows really inserted), used where a test needs traffic without a model."""
import json, os, random, signal, subprocess, threading, time, urllib.error, urllib.request
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from fraud_nb import db
from fraud_nb.config import Settings
from fraud_nb.dashboard import (DataSource, Dashboard, LabelTotals, RollupTotals, q_alerts, q_latency, q_precision, q_recall,
                                q_retrain_progress, q_retrain_runs, q_score_hist, q_scorers, q_series, q_stats_series,
                                q_throughput, q_rollup_sums, chart_range, render_tiles, render_runs)
from fraud_nb.stack import free_port, wait_until
from conftest import fraud_nb_cmd, service_env

# ---------------------------------------------------------------------------------------------------
# A writer that behaves like the scorer towards the database

HIST = ', '.join(f"count(*) FILTER (WHERE least(floor(probability * 10), 9) = {i})" for i in range(10))
WRITE_BATCH = sa.text(f'''
WITH ins AS (
    INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold, model_version,
                                     scored_at, kafka_ts, latency_ms, model_ms, kafka_partition, kafka_offset, scorer_id)
    SELECT r.tx_id, r.event_time, r.tx_time, r.amount, r.features, r.probability, r.probability >= r.threshold, r.threshold, r.model_version,
           now(), now() - make_interval(secs => r.latency_ms / 1000), r.latency_ms, r.model_ms, r.kafka_partition, r.kafka_offset, r.scorer_id
    FROM json_to_recordset(CAST(:rows AS json)) AS r(tx_id text, event_time timestamptz, tx_time float8, amount float8, features float8[],
         probability float8, threshold float8, model_version text, latency_ms float8, model_ms float8, kafka_partition int, kafka_offset bigint, scorer_id text)
    ON CONFLICT (tx_id) DO NOTHING
    RETURNING scored_at, model_version, is_fraud, probability, latency_ms, amount)
INSERT INTO scored_rollup (bucket, model_version, n, flagged, sum_prob, sum_latency, sum_amount, score_hist)
SELECT date_trunc('second', scored_at), model_version, count(*), count(*) FILTER (WHERE is_fraud), sum(probability),
       coalesce(sum(latency_ms), 0), sum(amount), ARRAY[{HIST}]
FROM ins GROUP BY 1, 2
ON CONFLICT (bucket, model_version) DO UPDATE SET
    n = scored_rollup.n + EXCLUDED.n, flagged = scored_rollup.flagged + EXCLUDED.flagged,
    sum_prob = scored_rollup.sum_prob + EXCLUDED.sum_prob, sum_latency = scored_rollup.sum_latency + EXCLUDED.sum_latency,
    sum_amount = scored_rollup.sum_amount + EXCLUDED.sum_amount,
    score_hist = (SELECT array_agg(a + b ORDER BY i) FROM unnest(scored_rollup.score_hist, EXCLUDED.score_hist) WITH ORDINALITY AS u(a, b, i))
''')


def write_batch(conn, rows: list[dict]):
    conn.execute(WRITE_BATCH, {'rows': json.dumps(rows)})


class ScorerSim:
    "Scores a synthetic stream at `rate` tx/s into the database like a scorer would, with scorer_stats and delayed labels."
    def __init__(self, url: str, rate: float = 200.0, scorer_id: str = 'sim-1', model_version: str = '1', label_delay: float = 3.0,
                 fraud_rate: float = 0.02, seed: int = 0, prefix: str = 'sim'):
        self.engine = db.make_engine(url)
        self.rate, self.scorer_id, self.model_version, self.label_delay, self.fraud_rate = rate, scorer_id, model_version, label_delay, fraud_rate
        self.rng, self.prefix = random.Random(seed), prefix
        self.n, self.stop_event, self.thread, self.pending = 0, threading.Event(), None, []

    def _rows(self, k: int) -> list[dict]:
        out = []
        for _ in range(k):
            fraud = self.rng.random() < self.fraud_rate
            p = min(0.999, self.rng.betavariate(5, 2)) if fraud else self.rng.random() ** 12
            out.append(dict(tx_id=f'{self.prefix}-{self.n}', event_time=datetime.now(timezone.utc).isoformat(), tx_time=self.n * 0.5,
                            amount=round(self.rng.expovariate(1 / 80), 2), features=[0.0] * 28, probability=p, threshold=0.5,
                            model_version=self.model_version, latency_ms=self.rng.uniform(5, 40), model_ms=self.rng.uniform(0.002, 0.02),
                            kafka_partition=self.n % 4, kafka_offset=self.n // 4, scorer_id=self.scorer_id, _fraud=fraud))
            self.n += 1
        return out

    def run(self, seconds: float | None = None, total: int | None = None):
        t0 = last_stats = time.monotonic(); sent_at_stats = 0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if seconds is not None and now - t0 >= seconds: break
            if total is not None and self.n >= total: break
            want = int((now - t0) * self.rate) - self.n
            if total is not None: want = min(want, total - self.n)
            if want > 0:
                rows = self._rows(want)
                with self.engine.begin() as c: write_batch(c, [{k: v for k, v in r.items() if k != '_fraud'} for r in rows])
                self.pending += [(now + self.label_delay, r['tx_id'], int(r['_fraud'])) for r in rows]
            due = [p for p in self.pending if p[0] <= now]
            if due:
                self.pending = [p for p in self.pending if p[0] > now]
                with self.engine.begin() as c:
                    c.execute(sa.text('INSERT INTO labels (tx_id, label, labeled_at) SELECT * FROM json_to_recordset(CAST(:r AS json)) '
                                      'AS x(tx_id text, label smallint, labeled_at timestamptz) ON CONFLICT DO NOTHING'),
                              {'r': json.dumps([dict(tx_id=t, label=l, labeled_at=datetime.now(timezone.utc).isoformat()) for _, t, l in due])})
            if now - last_stats >= 1.0:
                with self.engine.begin() as c:
                    c.execute(sa.text('''INSERT INTO scorer_stats (scorer_id, interval_s, processed, dead_letters, flagged, p50_ms, p95_ms, p99_ms,
                                                                   model_ms_per_tx, lag, model_version)
                                         VALUES (:s, :i, :p, 0, 0, 12, 30, 38, 0.01, :lag, :v)'''),
                              {'s': self.scorer_id, 'i': 1.0, 'p': self.n - sent_at_stats, 'lag': self.rng.randint(0, 50), 'v': self.model_version})
                last_stats, sent_at_stats = now, self.n
            time.sleep(0.05)

    def start(self, **kw):
        self.thread = threading.Thread(target=self.run, kwargs=kw, daemon=True); self.thread.start(); return self

    def stop(self):
        self.stop_event.set()
        if self.thread: self.thread.join(30)
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------------
# Hand-checkable data

def _engine(settings): return db.make_engine(settings.database_url)


def _now(conn) -> datetime:
    return conn.execute(sa.text("SELECT date_trunc('second', now())")).scalar() + timedelta(seconds=0.5)


def _scored(conn, tx_id, at, *, p=0.1, flag=False, amount=10.0, lat=10.0, model_ms=0.01, version='1'):
    conn.execute(sa.text('''INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold,
                            model_version, scored_at, latency_ms, model_ms, kafka_partition, kafka_offset, scorer_id)
                            VALUES (:id, :t, 0, :a, '{0}', :p, :f, 0.5, :v, :t, :lat, :mm, 0, 0, 's')'''),
                 dict(id=tx_id, t=at, a=amount, p=p, f=flag, v=version, lat=lat, mm=model_ms))


def _label(conn, tx_id, label, at):
    conn.execute(sa.text('INSERT INTO labels (tx_id, label, labeled_at, received_at) VALUES (:t, :l, :a, :a)'), dict(t=tx_id, l=label, a=at))


def test_rollup_totals_and_throughput(settings):
    eng = _engine(settings)
    with eng.begin() as c:
        now = _now(c)
        for sec_ago, n in [(2, 7), (5, 3), (9, 10), (11, 100), (45, 60), (61, 1000), (3600, 5)]:
            c.execute(sa.text('''INSERT INTO scored_rollup VALUES (:b, '1', :n, 1, :n * 0.25, :n * 10, :n * 2, '{0,0,0,0,0,0,0,0,0,0}')'''),
                      dict(b=now.replace(microsecond=0) - timedelta(seconds=sec_ago), n=n))
    with eng.connect() as c:
        # throughput: the 10 and 60 complete seconds before now
        assert q_throughput(c, now) == {'tps_10s': (7 + 3 + 10) / 10, 'tps_60s': (7 + 3 + 10 + 100 + 45 * 0 + 60) / 60}
        assert q_rollup_sums(c)['n'] == 1185
        assert q_rollup_sums(c, upto=now - timedelta(seconds=60))['n'] == 1005
        t = RollupTotals().read(c, now)
        assert (t['n'], t['flagged'], t['sum_amount']) == (1185, 7, 2370.0)
        assert t['avg_prob'] == pytest.approx(0.25) and t['avg_latency_ms'] == pytest.approx(10.0)
    eng.dispose()


def test_incremental_totals_follow_new_rows(settings):
    "Totals read incrementally stay equal to a full recount while rows keep arriving (the simulated scorer)."
    sim = ScorerSim(settings.database_url, rate=400, label_delay=0.2)
    rt, lt = RollupTotals(settle=timedelta(seconds=1), advance=timedelta(seconds=0.5)), LabelTotals(settle=timedelta(seconds=0.5), advance=timedelta(seconds=0.3))
    eng = _engine(settings)
    sim.start(seconds=4)
    seen = []
    try:
        for _ in range(12):
            with eng.connect() as c:
                c = c.execution_options(isolation_level='REPEATABLE READ')
                with c.begin():
                    now = c.execute(sa.text('SELECT now()')).scalar()
                    t, l = rt.read(c, now), lt.read(c, now)
                    full = c.execute(sa.text('SELECT count(*), count(*) FILTER (WHERE is_fraud) FROM scored_transactions')).one()
                    lab = c.execute(sa.text('SELECT count(*), coalesce(sum(label), 0) FROM labels')).one()
            assert (t['n'], t['flagged']) == tuple(full)
            assert (l['labeled'], l['frauds']) == tuple(lab)
            seen.append(t['n'])
            time.sleep(0.4)
    finally: sim.stop()
    assert seen[-1] > seen[0] and rt.settled['n'] > 0 and lt.n > 0   # rows arrived, and part of them were settled along the way
    eng.dispose()


def test_latency_scorers_alerts(settings):
    eng = _engine(settings)
    with eng.begin() as c:
        now = _now(c)
        for i in range(100): _scored(c, f'a{i}', now - timedelta(seconds=10, milliseconds=i), lat=float(i + 1), model_ms=(i + 1) / 100)
        _scored(c, 'old', now - timedelta(minutes=5), lat=10_000.0)              # too old for the latency window
        _scored(c, 'f1', now - timedelta(seconds=30), p=0.9, flag=True, amount=99.5)
        _scored(c, 'f2', now - timedelta(seconds=3), p=0.7, flag=True, amount=5.0)
        _scored(c, 'f3', now - timedelta(hours=3), p=0.99, flag=True)
        _label(c, 'f1', 1, now)
        c.execute(sa.text('''INSERT INTO scorer_stats (scorer_id, ts, interval_s, processed, dead_letters, flagged, p50_ms, lag, model_version)
                             VALUES ('a', :t1, 5, 500, 2, 3, 9, 11, '1'), ('a', :t0, 5, 100, 0, 0, 9, 99, '1'),
                                    ('b', :t2, 5, 50, 0, 0, 9, 4, '1'), ('c', :t3, 5, 1, 0, 0, 9, 1, '1')'''),
                  dict(t1=now - timedelta(seconds=2), t0=now - timedelta(seconds=7), t2=now - timedelta(seconds=20), t3=now - timedelta(hours=2)))
    with eng.connect() as c:
        assert q_latency(c, now)['n'] == 102                                     # the last minute: 100 rows, f1, f2
        lat = q_latency(c, now, last=50)
        assert lat['n'] == 50 and lat['e2e'][0] is not None
        lat = q_latency(c, now, within=timedelta(seconds=20))                  # 100 rows 10 s old + f2
        assert lat['n'] == 101
        sc = q_scorers(c, now)
        assert [(r['scorer_id'], r['live'], r['lag']) for r in sc] == [('a', True, 11), ('b', False, 4)]   # c: more than an hour ago
        assert sc[0]['rate'] == 100.0
        al = q_alerts(c, now, k=2)
        assert [a['tx_id'] for a in q_alerts(c, now - timedelta(seconds=10))] == ['f1', 'f3']   # as of 10 s ago
        assert [(a['tx_id'], a['label'], a['amount']) for a in al] == [('f2', None, 5.0), ('f1', 1, 99.5)]
    eng.dispose()


def test_latency_percentiles_are_exact(settings):
    eng = _engine(settings)
    with eng.begin() as c:
        now = _now(c)
        for i in range(101): _scored(c, f'a{i}', now - timedelta(seconds=5, milliseconds=i), lat=float(i), model_ms=i / 1000)
    with eng.connect() as c:
        lat = q_latency(c, now)
    assert lat['n'] == 101
    assert lat['e2e'] == pytest.approx([50.0, 95.0, 99.0]) and lat['model'] == pytest.approx([0.05, 0.095, 0.099])
    eng.dispose()


def test_series_hist_and_quality(settings):
    from fraud_nb.dashboard import floor_time
    eng = _engine(settings)
    with eng.begin() as c:
        now = floor_time(_now(c), timedelta(seconds=30)) + timedelta(seconds=0.5)   # aligned with the 5 s and the 30 s (quality) steps
        end = floor_time(now, timedelta(seconds=5))
        # two rollup rows in the same 5 s step, one in the step before, one in the current (incomplete) step
        for t, n, h in [(end - timedelta(seconds=1), 10, '{8,1,0,0,0,0,0,0,0,1}'), (end - timedelta(seconds=3), 20, '{20,0,0,0,0,0,0,0,0,0}'),
                        (end - timedelta(seconds=6), 5, '{0,0,0,0,0,5,0,0,0,0}'), (end, 1000, '{1000,0,0,0,0,0,0,0,0,0}')]:
            c.execute(sa.text("INSERT INTO scored_rollup VALUES (:t, '1', :n, 1, 1.0, :n, 0, CAST(:h AS bigint[]))"), dict(t=t, n=n, h=h))
        c.execute(sa.text('''INSERT INTO scorer_stats (scorer_id, ts, interval_s, processed, dead_letters, flagged, p50_ms, p95_ms, p99_ms, model_ms_per_tx)
                             VALUES ('a', :t, 5, 100, 0, 0, 10, 20, 30, 0.01), ('b', :t, 5, 300, 0, 0, 20, 40, 60, 0.03)'''), dict(t=end - timedelta(seconds=2)))
        # quality: 4 flagged (3 labelled: 2 fraud, 1 not), 3 frauds among labels (2 flagged, 1 missed)
        for i, (flag, label) in enumerate([(True, 1), (True, 1), (True, 0), (True, None), (False, 1), (False, 0)]):
            _scored(c, f'q{i}', end - timedelta(seconds=2), p=0.9 if flag else 0.1, flag=flag)
            if label is not None: _label(c, f'q{i}', label, now)
    with eng.connect() as c:
        start, e, step = chart_range(now, '5 min')
        assert e == end and e - start == timedelta(minutes=5) and step == timedelta(seconds=5)
        ser = q_series(c, start, e, step)
        assert [(r['t'], r['n']) for r in ser] == [(end - timedelta(seconds=10), 5), (end - timedelta(seconds=5), 30)]
        st = q_stats_series(c, start, e, step)
        assert len(st) == 1 and st[0]['p50_ms'] == pytest.approx(17.5) and st[0]['model_ms'] == pytest.approx(0.025)
        assert q_score_hist(c, start, e) == [28, 1, 0, 0, 0, 5, 0, 0, 0, 1]
        p, r = q_precision(c, start, e, step), q_recall(c, start, e, step)
        assert [(x['flagged_labeled'], x['tp']) for x in p] == [(3, 2)]
        assert [(x['frauds'], x['tp']) for x in r] == [(3, 2)]
    snap = DataSource(settings, reasons=False).snapshot(now=now, registry=False)
    assert snap.quality == {'precision': 2 / 3, 'flagged_labeled': 3, 'recall': 2 / 3, 'frauds_labeled': 3}
    eng.dispose()


def test_recall_query_uses_the_fraud_label_index(settings):
    "The recall join starts from the partial index of migration 002, not from a scan of all labels."
    eng = _engine(settings)
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO labels (tx_id, label, labeled_at, received_at) SELECT 't' || g, (g % 500 = 0)::int, now(), now() - g * interval '1 second' FROM generate_series(1, 50000) g"))
        c.execute(sa.text('ANALYZE labels'))
    with eng.connect() as c:
        now = c.execute(sa.text('SELECT now()')).scalar()
        start, end, step = chart_range(now, '1 hour')
        plan = '\n'.join(c.execute(sa.text('''EXPLAIN SELECT count(*) FROM labels l JOIN scored_transactions s ON s.tx_id = l.tx_id
                                              WHERE l.label = 1 AND l.received_at >= :start AND s.scored_at >= :start AND s.scored_at < :end'''),
                                    {'start': start, 'end': end}).scalars())
    assert 'labels_fraud_received' in plan, plan
    eng.dispose()


def test_retrain_progress_and_runs(settings):
    eng = _engine(settings)
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO labels (tx_id, label, labeled_at) SELECT 'l' || g, 0, now() FROM generate_series(1, 30) g"))
        c.execute(sa.text('''INSERT INTO retrain_runs (run_id, started_at, trigger, label_watermark, new_labels, status, decision, challenger_version, report_html)
                             VALUES ('r1', now() - interval '2 hours', 'labels', 10, 10, 'succeeded', 'promoted', '2', '/x/reports/retrain-r1.html'),
                                    ('r2', now() - interval '1 hour', 'labels', 25, 15, 'failed', NULL, NULL, NULL),
                                    ('r3', now(), 'labels', 28, 3, 'running', NULL, NULL, NULL)'''))
    with eng.connect() as c:
        assert q_retrain_progress(c, 50) == {'watermark': 10, 'new_labels': 20, 'threshold': 50, 'capped': False, 'progress': 0.4}
        assert q_retrain_progress(c, 1)['progress'] == 1.0
        runs = q_retrain_runs(c)
        assert [r['run_id'] for r in runs] == ['r3', 'r2', 'r1']
    snap = DataSource(settings, reasons=False).snapshot(registry=False)
    html = render_runs(snap, '/')
    assert html.count('href="/reports/retrain-r1.html"') == 1 and 'data-value="3"' in html
    eng.dispose()


def test_states_no_data_unreachable_stack_down(settings, tmp_path):
    assert DataSource(settings).snapshot(registry=False).state == 'no-data'
    bad = replace(settings, database_url=db.with_database(settings.database_url, 'no_such_database'))
    s = DataSource(bad).snapshot(registry=False)
    assert s.state == 'db-unreachable' and 'no_such_database' in s.message
    # an embedded stack whose state file is gone: "stack down"
    state = tmp_path/'state'; (state/'pg').mkdir(parents=True)
    gone = Settings(state_dir=state, database_url=f'postgresql+psycopg2://postgres@/fraud_nb?host={state}/pg')
    s = DataSource(gone).snapshot(registry=False)
    assert s.state == 'stack-down' and 'fraud-nb up' in s.message
    assert DataSource(Settings(state_dir=tmp_path/'none')).snapshot().state == 'stack-down'
    # a page keeps its last figures, marked stale, when the database goes away
    d = Dashboard(DataSource(settings, reasons=False), base_url='/')
    d.refresh(registry=False)
    assert 'data-testid="total" data-value="0"' in d.tiles.value
    d.source.fixed = bad
    d.refresh(registry=False)
    assert 'database unreachable' in d.header.value and 'Figures below are from' in d.header.value
    assert 'data-testid="total"' in d.tiles.value


def test_dashboard_connection_is_read_only(settings):
    src = DataSource(settings)
    src.snapshot(registry=False)
    with pytest.raises(sa.exc.InternalError, match='read-only'):
        with src.engine.begin() as c: c.execute(sa.text("INSERT INTO labels (tx_id, label, labeled_at) VALUES ('x', 1, now())"))
    src.close()


def test_champion_from_the_registry(settings):
    "The champion tile reads the registry: none yet, then the version with its metrics and promotion time."
    from mlflow.tracking import MlflowClient
    bg = DataSource(settings, reasons=False, champion_ttl=0)           # the page's way: the registry is read in a thread
    assert bg.snapshot().champion['state'] == 'loading'
    bg.champion._thread.join(60)
    assert bg.snapshot().champion['state'] == 'none'
    bg.close()
    src = DataSource(settings, reasons=False, champion_ttl=0, background=False)
    assert src.snapshot().champion['state'] == 'none'
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    exp = client.create_experiment(settings.experiment, artifact_location=settings.mlflow_artifact_root)
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, 'holdout_average_precision', 0.81); client.log_metric(run.info.run_id, 'holdout_recall', 0.7)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(settings.model_name)
    mv = client.create_model_version(settings.model_name, source=f'{settings.mlflow_artifact_root}/m', run_id=run.info.run_id)
    client.set_registered_model_alias(settings.model_name, 'champion', mv.version)
    eng = _engine(settings)
    with eng.begin() as c:
        c.execute(sa.text('''INSERT INTO retrain_runs (run_id, trigger, label_watermark, status, decision, challenger_version, finished_at)
                             VALUES ('r1', 'labels', 1, 'succeeded', 'promoted', :v, now() - interval '90 seconds')'''), {'v': str(mv.version)})
    snap = src.snapshot()
    ch = snap.champion
    assert ch['state'] == 'ok' and ch['version'] == str(mv.version) and ch['metrics']['holdout_average_precision'] == pytest.approx(0.81)
    assert ch['promoted_at'] is not None
    html = render_tiles(snap)
    assert f'data-testid="champion" data-value="{mv.version}"' in html and 'promoted 90 s ago' in html and 'average_precision 0.810' in html
    eng.dispose(); src.close()


# ---------------------------------------------------------------------------------------------------
# The server

def _get(url, accept='text/html', timeout=10):
    req = urllib.request.Request(url, headers={'Accept': accept})
    with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, r.read().decode(errors='replace')


def start_dashboard(settings, *args, port=None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {**service_env(settings), 'FRAUD_NB_DASHBOARD_PORT': str(port)}
    log = open(Path(settings.reports_dir).parent/f'dashboard-{port}.log', 'wb')
    p = subprocess.Popen(fraud_nb_cmd('dashboard', *args), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}/'
    try: wait_until(lambda: _get(url + 'healthz', 'application/json')[0] == 200, 60, 'dashboard', interval=0.3, proc=psutil.Process(p.pid))
    except Exception:
        stop_dashboard(p); raise RuntimeError('dashboard did not start:\n' + Path(log.name).read_text()[-3000:])
    return p, url


def stop_dashboard(p: subprocess.Popen):
    "SIGTERM the server and check it leaves no kernel behind."
    procs = [p_ for p_ in psutil.Process(p.pid).children(recursive=True)] if psutil.pid_exists(p.pid) else []
    os.killpg(p.pid, signal.SIGTERM)
    try: p.wait(30)
    except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait(10)
    gone, alive = psutil.wait_procs(procs, timeout=15)
    for q in alive: q.kill()
    return alive


def _kernels(url): return json.loads(_get(url + 'healthz', 'application/json')[1])['kernels']


def test_server_reports_probe_cap_and_orphans(settings):
    "fraud-nb dashboard: serves reports, answers probes without kernels, caps pages, shuts down kernels no browser uses."
    reports = Path(settings.reports_dir); reports.mkdir(parents=True)
    (reports/'retrain-x.html').write_text('<html><body>REPORT-X</body></html>')
    (reports/'secret.txt').write_text('no')
    p, url = start_dashboard(settings, '--max-kernels', '2', '--orphan-timeout', '15', '--cull-interval', '1')
    try:
        assert _get(url + 'reports/retrain-x.html') == (200, '<html><body>REPORT-X</body></html>')
        for bad in ('reports/secret.txt', 'reports/../../etc/passwd', 'reports/nope.html'):
            with pytest.raises(urllib.error.HTTPError) as e: _get(url + bad)
            assert e.value.code in (403, 404)
        # a probe (no text/html in Accept) gets text and starts no kernel
        status, body = _get(url, accept='*/*')
        assert status == 200 and 'open this URL in a browser' in body and _kernels(url) == 0
        # a page (no browser to connect to it): a kernel that runs the dashboard, with figures in the HTML
        status, page = _get(url, timeout=60)
        assert status == 200 and _kernels(url) == 1
        _get(url, timeout=60)
        assert _kernels(url) == 2
        with pytest.raises(urllib.error.HTTPError) as e: _get(url, timeout=60)      # the cap
        assert e.value.code == 503
        # no browser ever connected: both kernels are shut down after the orphan timeout
        wait_until(lambda: _kernels(url) == 0, 40, 'orphan kernels culled')
        assert _get(url, timeout=60)[0] == 200                                       # room again
    finally:
        alive = stop_dashboard(p)
    assert not alive, f'processes left after SIGTERM: {alive}'
