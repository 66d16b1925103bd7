"Helpers shared by the streaming tests (test_stream, test_scorer, test_scorer_faults, test_hot_reload)."
import signal, subprocess, threading, time, uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg2

from conftest import service_env, fraud_nb_cmd
from fraud_nb.pg import pg_params


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    "Poll `check()` until truthy; fail with `what` after `timeout` s. Returns the truthy value."
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v: return v
        except Exception as e: last = e
        time.sleep(interval)
    raise AssertionError(f'timed out after {timeout:.0f} s waiting for {what}' + (f' (last error: {last})' if last else ''))


def query(settings, sql, params=None):
    "Rows of one query on the settings' database (a fresh connection each time: works across outages)."
    conn = psycopg2.connect(**pg_params(settings.database_url), connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally: conn.close()


def scored_count(settings) -> int:
    return query(settings, 'SELECT count(*) FROM scored_transactions')[0][0]


def train_champion(settings, seed: int = 3, alias: str | None = 'champion') -> str:
    "Train a small model on synthetic data and register it (as champion by default); return its version."
    from fraud_nb.data import synthetic_transactions, time_split
    from fraud_nb.model import train_model
    from fraud_nb import registry
    tr, va, _ = time_split(synthetic_transactions(20_000, seed=seed, fraud_rate=0.01))
    model = train_model(tr, va, n_estimators=30, seed=seed)
    return with_reference(settings, registry.register_model(model, settings, metrics={}, alias=alias), model)


def with_reference(settings, version: str, model) -> str:
    "Make sure `version` has its `reference.json` (until register_model logs it itself); return `version`."
    from fraud_nb.drift import log_reference, load_reference
    if model.reference is not None and load_reference(settings, version, model.features) is None:
        log_reference(settings, version, model.reference)
    return version


def register_mismatched(settings) -> str:
    "A registered version whose declared feature list differs from this fraud_nb's (as if trained by another release)."
    import json
    from mlflow import MlflowClient
    from fraud_nb.model import FEATURES
    v = train_champion(settings, seed=9, alias=None)
    c = MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    c.set_model_version_tag(settings.model_name, v, 'features', json.dumps(FEATURES[:-1] + ['hour_of_week']))
    c.set_model_version_tag(settings.model_name, v, 'feature_version', '0')
    return v


def produce(settings, n: int, seed: int = 0, rate: float = 0, labels: bool = False):
    "Replay `n` synthetic transactions into the settings' topic; return their tx_ids (in send order)."
    from fraud_nb.data import synthetic_transactions
    from fraud_nb.stream import Replayer
    df = synthetic_transactions(n, seed=seed, fraud_rate=0.01)
    if not labels: df = df.drop(columns=['Class'])
    r = Replayer(settings, df, rate=rate, label_delay_s=0)
    s = r.run(progress=False)
    assert s.delivered == n and s.failed == 0, s.line()
    return [f'{r.prefix}.0-{i}' for i in range(n)]


class BackgroundProducer(threading.Thread):
    "Replays `n` synthetic transactions at `rate` tx/s in a thread; `.ids` are the tx_ids, `.summary` the result."
    def __init__(self, settings, n: int, rate: float, seed: int = 0):
        super().__init__(daemon=True)
        from fraud_nb.data import synthetic_transactions
        from fraud_nb.stream import Replayer
        self.r = Replayer(settings, synthetic_transactions(n, seed=seed, fraud_rate=0.01).drop(columns=['Class']), rate=rate, label_delay_s=0)
        self.n, self.ids, self.summary = n, [f'{self.r.prefix}.0-{i}' for i in range(n)], None
    def run(self): self.summary = self.r.run(progress=False)


def send_raw(settings, values: list, keys: list | None = None, partition: int | None = None):
    from confluent_kafka import Producer
    p = Producer({'bootstrap.servers': settings.kafka_bootstrap, 'enable.idempotence': True})
    for i, v in enumerate(values):
        kw = {} if partition is None else {'partition': partition}
        p.produce(settings.topic_transactions, v, key=(keys[i] if keys else f'raw-{i}'), **kw)
    assert p.flush(30) == 0


def read_topic(settings, topic: str, n: int, timeout: float = 30) -> list:
    "At least `n` messages of `topic` from the start of every partition (assign: no group join), or all there are after `timeout`."
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({'bootstrap.servers': settings.kafka_bootstrap, 'group.id': uuid.uuid4().hex, 'enable.auto.commit': False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in c.consume(500, 0.2) if not m.error()]
        return out
    finally: c.close()


def start_scorer(settings, log_path: Path, *args, env_extra: dict | None = None) -> subprocess.Popen:
    "`fraud-nb score` as a child process with the test's settings, its output in `log_path`."
    out = open(log_path, 'ab')
    return subprocess.Popen(fraud_nb_cmd('score', *args), env={**service_env(settings), **(env_extra or {})},
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> int:
    "Signal `proc` and wait for it; SIGKILL if it does not exit in `timeout` s. Returns the exit code."
    if proc.poll() is None:
        proc.send_signal(sig)
        try: proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill(); proc.wait(10)
    return proc.returncode


def tail(path: Path, n: int = 60) -> str:
    try: return '\n'.join(Path(path).read_text(errors='replace').splitlines()[-n:])
    except FileNotFoundError: return '(no log)'


def check_exactly_once(settings, expected_ids: list[str]):
    "Every expected tx_id is in scored_transactions once with a probability and a version; the rollup counts each row once."
    rows = query(settings, 'SELECT tx_id, probability, model_version FROM scored_transactions')
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids))
    missing = set(expected_ids) - set(ids)
    assert not missing, f'{len(missing)} transaction(s) never scored, e.g. {sorted(missing)[:5]}'
    extra = set(ids) - set(expected_ids)
    assert not extra, f'unexpected rows {sorted(extra)[:5]}'
    assert all(0 <= r[1] <= 1 and r[2] for r in rows)
    check_rollup(settings)
    (n_rollup,), = query(settings, 'SELECT coalesce(sum(n), 0) FROM scored_rollup')
    assert n_rollup == len(expected_ids), f'rollup counts {n_rollup} rows for {len(expected_ids)} transactions'


def check_rollup(settings):
    "The per-second rollup agrees with the rows, bucket by bucket (counts, flags, sums, histogram), whichever write path made it."
    rows = query(settings, '''SELECT date_trunc('second', scored_at), model_version, count(*), count(*) FILTER (WHERE is_fraud),
                              sum(probability), sum(latency_ms), sum(amount),
                              array_agg(least(floor(probability * 10), 9)::int) FROM scored_transactions GROUP BY 1, 2''')
    rollup = {(r[0], r[1]): r[2:] for r in query(settings, 'SELECT bucket, model_version, n, flagged, sum_prob, sum_latency, sum_amount, score_hist FROM scored_rollup')}
    assert set(rollup) == {(r[0], r[1]) for r in rows}, 'rollup buckets differ from the rows\' seconds'
    for b, v, n, flagged, sp, sl, sa, deciles in rows:
        rn, rf, rsp, rsl, rsa, hist = rollup[(b, v)]
        assert (rn, rf) == (n, flagged), (b, v)
        assert abs(rsp - sp) < 1e-6 * max(1, n) and abs(rsl - sl) < 1e-3 * max(1, n) and abs(rsa - sa) < 1e-6 * max(1, abs(sa)), (b, v)
        assert list(hist) == [deciles.count(i) for i in range(10)], (b, v)


def assigned_partitions(log_path: Path):
    "The partitions in the last `assigned` line of a scorer log (None before the first assignment)."
    import re
    try: lines = [l for l in Path(log_path).read_text(errors='replace').splitlines() if ' assigned ' in l]
    except FileNotFoundError: return None
    return re.findall(r'\[(\d+)\]', lines[-1]) if lines else None


def wait_consuming(log_path: Path, n_partitions: int | None = None, timeout: float = 90):
    "Wait until the scorer logging to `log_path` owns partitions (exactly `n_partitions` if given)."
    def ok():
        a = assigned_partitions(log_path)
        return a is not None and len(a) > 0 and (n_partitions is None or len(a) == n_partitions)
    wait_for(ok, timeout, f'the scorer of {log_path.name} to be assigned partitions')


@contextmanager
def scorer_under_stream(settings, log_path: Path, n: int, rate: float, seed: int, rows_first: int):
    """Start `fraud-nb score`, wait until it owns its partitions, stream `n` synthetic transactions at `rate` tx/s from a
    background producer, and wait until `rows_first` rows are scored: yields `(scorer process, producer)` for the test's
    fault; the producer is told to stop and the scorer is stopped on the way out, whatever happened."""
    prod = BackgroundProducer(settings, n, rate=rate, seed=seed)
    proc = start_scorer(settings, log_path)
    try:
        wait_consuming(log_path)
        prod.start()
        wait_for(lambda: scored_count(settings) >= rows_first, 90, f'{rows_first:,} rows scored\n' + tail(log_path))
        yield proc, prod
    finally:
        prod.r.stop(); stop(proc)


def finish_stream(settings, prod: BackgroundProducer, proc: subprocess.Popen, log_path: Path, committed_offsets=None):
    "Let the producer finish, wait for every row (and every offset, given a counter of committed offsets), stop the scorer cleanly."
    prod.join(90)
    assert prod.summary is not None and prod.summary.failed == 0, prod.summary and prod.summary.line()
    wait_for(lambda: scored_count(settings) >= prod.n, 120, f'all {prod.n:,} rows\n' + tail(log_path))
    if committed_offsets: wait_for(lambda: committed_offsets(settings) == prod.n, 60, 'the offsets of every message committed')
    assert stop(proc) == 0, tail(log_path)


def train_raw_model(seed: int = 11):
    "A small raw-event model fitted on a simulated history (fit_model over RAW_EVENTS.batch)."
    from fraud_nb.simulator import simulate
    from fraud_nb.features import RAW_EVENTS
    from fraud_nb.model import fit_model
    h = simulate(days=30, customers=600, terminals=900, seed=seed)
    X, y, cut = RAW_EVENTS.batch(h), h.Class.to_numpy(), [int(len(h) * .7), len(h)]
    return fit_model(X[:cut[0]], y[:cut[0]], X[cut[0]:], y[cut[0]:], h.amount.to_numpy()[cut[0]:], feature_set=RAW_EVENTS,
                     n_estimators=30, seed=seed, refit=False)


def train_raw_champion(settings, seed: int = 11, alias: str | None = 'champion', feature_set_version: str | None = None) -> str:
    "Train a small raw-event model on a simulated history (fit_model over RAW_EVENTS.batch) and register it; return its version."
    from fraud_nb import registry
    m = train_raw_model(seed)
    if feature_set_version is not None: m.feature_set_version = feature_set_version
    return with_reference(settings, registry.register_model(m, settings, metrics={}, alias=alias), m)


def start_labels(settings, log_path: Path) -> subprocess.Popen:
    "`fraud-nb labels` as a child process with the test's settings."
    out = open(log_path, 'ab')
    return subprocess.Popen(fraud_nb_cmd('labels'), env=service_env(settings), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
