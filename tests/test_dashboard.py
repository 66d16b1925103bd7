"""The dashboard against real services: incremental totals under a concurrent writer, the champion from a real MLflow
registry, and the server (`fraud-nb dashboard`: reports, health probe, kernel cap, orphan culling). The queries, the
snapshot and the rendering are tested with hand-checkable rows in their chapters (nbs/16_dashboard_queries.ipynb to
nbs/18_dashboard.ipynb).

Also home of `ScorerSim`, a stand-in writer that inserts scored rows and their rollup exactly like the
scorer's contract says (one transaction per batch, `ON CONFLICT (tx_id) DO NOTHING`, the rollup counting
only the rows really inserted), used where a test needs traffic without a model."""
import json, os, random, re, signal, subprocess, threading, time, urllib.error, urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from confluent_kafka import Producer

from fraud_nb import db
from fraud_nb.dashboard_data import DataSource
from fraud_nb.dashboard_queries import LabelTotals, RollupTotals
from fraud_nb.dashboard_view import render_tiles
from fraud_nb.registry import CHAMPION
from fraud_nb.procs import free_port, wait_until
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
# Against the database and the registry

def _engine(settings): return db.make_engine(settings.database_url)


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


def test_champion_from_the_registry(settings):
    """The champion tile reads the registry: none yet, then a raw-event version promoted by a retraining run, with its evidence (frauds and
    intervals, as `retrain.evidence_tags` writes them), its feature set, and the runs table with the run's evidence; a raw-event stream
    shows its kind and simulated clock, and its alerts' reasons (from the real alerts topic) name raw-event features."""
    from fraud_nb import compare, retrain
    from fraud_nb.contracts import encode_alert
    from fraud_nb.dashboard_charts import chart_data
    from fraud_nb.dashboard_view import render_alerts, render_runs
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
    for k, v in {'holdout_average_precision': 0.81, 'holdout_recall': 0.7, 'holdout_n': 9000, 'holdout_frauds': 41}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    dec = compare.Decision(True, 'promoted (rule: ...)', 0.95, (-820.0, -40.0), (-0.012, 0.07), 41, None, look=2, cost_diff=-400.0, ap_diff=0.031)
    ev = retrain.evidence(dec, {'holdout_frauds': 41})
    client.create_registered_model(settings.model_name)
    mv = client.create_model_version(settings.model_name, source=f'{settings.mlflow_artifact_root}/m', run_id=run.info.run_id,
                                     tags={'fraud_nb.feature_set': 'raw_events', 'fraud_nb.feature_set_version': '1', 'data': 'simulated:35:seed=1',
                                           **retrain.evidence_tags(ev)})
    client.set_registered_model_alias(settings.model_name, CHAMPION, mv.version)
    eng = _engine(settings)
    sim0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    with eng.begin() as c:
        c.execute(sa.text('''INSERT INTO retrain_runs (run_id, trigger, label_watermark, status, decision, challenger_version, finished_at,
                                                      challenger_metrics, evidence)
                             VALUES ('r1', 'labels', 1, 'succeeded', 'promoted', :v, now() - interval '90 seconds', :m, :ev)'''),
                  {'v': str(mv.version), 'm': json.dumps({'average_precision': 0.81, 'frauds': 41}), 'ev': json.dumps(ev)})
        # a raw-event stream as the scorer writes it (card, terminal, event time on the simulated clock: 1 min per wall second)
        for i in range(20):
            c.execute(sa.text('''INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold,
                                     model_version, scored_at, kafka_partition, kafka_offset, scorer_id, card_id, terminal_id, label_seq)
                                 VALUES (:id, :et, 0, 12.5, '{0}', :p, :f, 0.5, :v, now() - make_interval(secs => :ago), 0, :i, 's', :card, 't9', 0)'''),
                      {'id': f'raw-{i}', 'et': sim0 + timedelta(minutes=i), 'p': 0.9 if i == 19 else 0.1, 'f': i == 19, 'v': str(mv.version),
                       'ago': 19 - i, 'i': i, 'card': f'card-{i % 4}'})
    prod = Producer({'bootstrap.servers': settings.kafka_bootstrap})
    prod.produce(settings.topic_alerts, encode_alert('raw-19', 0.9, 0.5, str(mv.version), datetime.now(timezone.utc).isoformat(), 12.5,
                                                     [('term_risk_7d', 1.9), ('amount_to_mean_30d', 0.8), ('night', 0.2)]), key='raw-19')
    assert prod.flush(10) == 0
    src = DataSource(settings, champion_ttl=0, background=False)      # with the alerts topic this time
    wait_until(lambda: (src.snapshot().alerts or [{}])[0].get('reasons'), 60, 'the alert\'s reasons read from the topic', interval=0.5)
    snap = src.snapshot()
    ch = snap.champion
    assert ch['state'] == 'ok' and ch['version'] == str(mv.version) and ch['metrics']['holdout_average_precision'] == pytest.approx(0.81)
    assert ch['promoted_at'] is not None
    html = render_tiles(snap)
    assert re.search(r'promoted (9\d|1\d\d) s ago', html), html
    for want in [f'data-testid="champion" data-value="{mv.version}"', 'holdout 9,000 tx, ', 'data-value="41.0">41 frauds</span>: average_precision 0.810',
                 'ΔAP +0.031 [-0.012, +0.070] · Δcost -400 [-820, -40] (95 % interval, look 2)', 'data-testid="feature-set" data-value="raw_events"',
                 'simulated training data', 'data-testid="stream" data-value="raw_events"', 'event time simulated: ×60 the wall clock']:
        assert want in html, want
    assert 'the champion computes' not in html
    alerts = render_alerts(snap)
    assert 'card-3 · t9' in alerts and 'term_risk_7d +1.90, amount_to_mean_30d +0.80, night +0.20' in alerts and '2026-03-01 00:19:00 UTC' in alerts
    assert 'data-testid="run-evidence" data-value="41">41 holdout frauds · ΔAP +0.031 [-0.012, +0.070]' in render_runs(snap)
    assert 'v' + str(mv.version) + ' AP 0.810 on 41 frauds' in render_runs(snap)
    assert chart_data(snap)['xlabel'].endswith('event time runs ×60 (simulated)')
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
    p, url = start_dashboard(settings, '--max-kernels', '2', '--orphan-timeout', '30', '--cull-interval', '1')   # 30 s: longer than two page loads on a slow machine
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
        wait_until(lambda: _kernels(url) == 0, 60, 'orphan kernels culled')
        assert _get(url, timeout=60)[0] == 200                                       # room again
    finally:
        alive = stop_dashboard(p)
    assert not alive, f'processes left after SIGTERM: {alive}'
