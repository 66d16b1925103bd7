"""The producer (`fraud-nb produce`) and the label sink (`fraud-nb labels`) against the real embedded broker.

The contracts' unit tests (every malformed message refused with its reason, the batch decoder agreeing with the reference
validator, the exact round trip) live in their chapter, nbs/09_contracts.ipynb."""
import json, subprocess, time

from fraud_nb.contracts import parse_event_times
from conftest import service_env, fraud_nb_cmd
from scorer_helpers import read_topic, query

def test_produce_cli_sends_transactions_then_delayed_labels(settings):
    "fraud-nb produce: every row once, in Time order per partition, no Class; labels after the delay; unique ids across runs; summary."
    env = service_env(settings)
    r = subprocess.run(fraud_nb_cmd('produce', '--synthetic', '3000', '--rate', '0', '--label-delay', '1.5', '--seed', '4'),
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'sent 3,000 transactions' in r.stdout and 'delivered 3,000, failed 0' in r.stdout and 'labels sent 3,000' in r.stdout, r.stdout
    txs = read_topic(settings, settings.topic_transactions, 3000)
    assert len(txs) == 3000
    docs = [json.loads(m.value()) for m in txs]
    assert all('Class' not in d for d in docs) and all(m.key().decode() == d['tx_id'] for m, d in zip(txs, docs))
    assert len({d['tx_id'] for d in docs}) == 3000
    for p in {m.partition() for m in txs}:  # Time order is kept within each partition
        times = [d['Time'] for m, d in zip(txs, docs) if m.partition() == p]
        assert times == sorted(times)
    labels = [json.loads(m.value()) for m in read_topic(settings, settings.topic_labels, 3000)]
    assert sorted(l['tx_id'] for l in labels) == sorted(d['tx_id'] for d in docs)
    event = dict(zip([d['tx_id'] for d in docs], parse_event_times([d['event_time'] for d in docs])))
    labeled = parse_event_times([l['labeled_at'] for l in labels])
    delays = [(la - event[l['tx_id']]) / 1e6 for l, la in zip(labels, labeled)]
    assert min(delays) >= 1.5 - 0.05, f'a label went out {min(delays):.3f} s after its transaction'
    # a second run never reuses a tx_id
    r2 = subprocess.run(fraud_nb_cmd('produce', '--synthetic', '500', '--rate', '0', '--no-labels'), env=env,
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    ids = [m.key() for m in read_topic(settings, settings.topic_transactions, 3500)]
    assert len(ids) == 3500 == len(set(ids))


def test_produce_rate_limit(settings):
    "--rate 400 --n 800 cannot finish in less than ~2 s (a lower bound: the limiter sleeps; no upper bound asserted)."
    t0 = time.monotonic()
    r = subprocess.run(fraud_nb_cmd('produce', '--synthetic', '5000', '--n', '800', '--rate', '400', '--no-labels'),
                       env=service_env(settings), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'sent 800 transactions' in r.stdout
    assert time.monotonic() - t0 >= 1.9


def test_label_sink_cli_upserts_and_dead_letters(settings):
    from confluent_kafka import Producer
    from fraud_nb.contracts import encode_label, read_dead_letter
    p = Producer({'bootstrap.servers': settings.kafka_bootstrap})
    for i in range(500): p.produce(settings.topic_labels, encode_label(f'l-{i}', int(i % 10 == 0)), key=f'l-{i}')
    p.produce(settings.topic_labels, b'{"tx_id": "l-bad", "label": 7, "labeled_at": "2026-01-01T00:00:00Z"}', key='l-bad')
    p.produce(settings.topic_labels, encode_label('l-3', 1), key='l-3')  # a correction within the stream
    assert p.flush(10) == 0
    r = subprocess.run(fraud_nb_cmd('labels', '--stop-after', '502'), env=service_env(settings), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (n, pos, l3), = query(settings, "SELECT count(*), sum(label), (SELECT label FROM labels WHERE tx_id = 'l-3') FROM labels")
    assert (n, pos, l3) == (500, 51, 1)
    dead = [read_dead_letter(m) for m in read_topic(settings, settings.topic_labels_dlq, 1)]   # refused labels: the labels DLQ
    assert len(dead) == 1 and dead[0]['key'] == b'l-bad' and 'label must be 0 or 1' in dead[0]['reason']
    assert dead[0]['topic'] == settings.topic_labels


def _produce(settings, *args):
    return subprocess.run(fraud_nb_cmd('produce', '--rate', '0', *args), env=service_env(settings), capture_output=True, text=True, timeout=120)


def test_produce_data_errors_are_one_line_and_no_labels_needs_no_class(settings, tmp_path):
    "Issue 18 trap 8: a damaged .csv.gz is one line naming the file (exit 2, no traceback); --no-labels replays a file without Class."
    from fraud_nb.data import synthetic_transactions
    df = synthetic_transactions(300, seed=5)
    df.to_csv(tmp_path/'ok.csv.gz', index=False)
    (tmp_path/'cut.csv.gz').write_bytes((tmp_path/'ok.csv.gz').read_bytes()[:-40])           # a truncated download
    df.drop(columns='Class').to_csv(tmp_path/'unlabelled.csv', index=False)
    for args, needle in ((['--data', str(tmp_path/'cut.csv.gz')], f'{tmp_path/"cut.csv.gz"}: not a readable CSV (.gz)'),
                         (['--data', str(tmp_path/'unlabelled.csv')], "missing column(s) 'Class'")):   # labels asked for: Class needed
        r = _produce(settings, *args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _produce(settings, '--data', str(tmp_path/'unlabelled.csv'), '--no-labels')
    assert r.returncode == 0 and 'sent 300 transactions' in r.stdout, r.stdout + r.stderr


def test_produce_drift_replays_what_monitoring_must_notice(settings):
    "--drift: the frame goes through fraud_nb.monitor.drift_transactions before it is sent, and the producer says so."
    from fraud_nb.contracts import NUMERIC_FIELDS, decode_transactions
    from fraud_nb.data import synthetic_transactions
    from fraud_nb.monitor import drift_transactions
    r = _produce(settings, '--synthetic', '400', '--seed', '6', '--no-labels', '--drift')
    assert r.returncode == 0 and 'DRIFTED on purpose' in r.stdout, r.stdout + r.stderr
    d = decode_transactions([m.value() for m in read_topic(settings, settings.topic_transactions, 400)])
    sent = sorted(map(tuple, d.values.round(6).tolist()))
    want = sorted(map(tuple, drift_transactions(synthetic_transactions(400, seed=6))[NUMERIC_FIELDS].to_numpy().round(6).tolist()))
    assert len(sent) == 400 and sent == want


def test_group_lag_counts_every_record_of_a_multi_record_batch(settings):
    "`down`'s count of what is left: 25 labels sent as one batch per partition are 25, not one per batch (the embedded broker's ListOffsets answer is the last batch's base offset + 1)."
    from confluent_kafka import Consumer, Producer, TopicPartition
    from fraud_nb.health import group_lag
    s = settings
    p = Producer({'bootstrap.servers': s.kafka_bootstrap, 'linger.ms': 200})   # a long linger: each partition gets one batch
    for i in range(25): p.produce(s.topic_labels, b'{}', key=f'lag-{i}')
    assert p.flush(10) == 0
    assert group_lag(s.kafka_bootstrap, s.labels_group, s.topic_labels) == 25   # nothing committed: all of it
    c = Consumer({'bootstrap.servers': s.kafka_bootstrap, 'group.id': s.labels_group, 'enable.auto.commit': False})
    parts = sorted(c.list_topics(s.topic_labels, timeout=5).topics[s.topic_labels].partitions)
    c.commit(offsets=[TopicPartition(s.topic_labels, parts[0], 2)], asynchronous=False); c.close()
    assert group_lag(s.kafka_bootstrap, s.labels_group, s.topic_labels) == 23   # two committed in one partition


def test_label_batches_commit_in_seq_order(settings):
    "Two label sinks at once: a batch takes `labels.seq` under a lock held to its commit, so a reader of `seq > n` (terminal risk, the retrainer's watermark) never sees a later seq before an earlier one."
    import threading
    from fraud_nb.labels import LabelWriter
    from fraud_nb.pg import LABEL_WRITE_LOCK, pg_connect
    from scorer_helpers import wait_for
    first = pg_connect(settings.database_url)   # a first sink, between its upsert and its commit
    cur = first.cursor()
    cur.execute('SELECT pg_advisory_xact_lock(%s)', (LABEL_WRITE_LOCK,))
    cur.execute("INSERT INTO labels (tx_id, label, labeled_at) VALUES ('seq-first', 0, now())")
    second = threading.Thread(target=LabelWriter(settings.database_url).write, args=([('seq-second', 1, '2026-11-01T00:00:00Z')],), daemon=True)
    second.start()
    try:
        waiting = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s"""
        wait_for(lambda: query(settings, waiting, (LABEL_WRITE_LOCK,))[0][0] == 1, 30, 'the second writer to wait for the lock')
        assert second.is_alive() and query(settings, 'SELECT tx_id FROM labels') == [], 'nothing visible before the first commit'
        first.commit()
    finally: first.close()
    second.join(30)
    assert not second.is_alive()
    seqs = dict(query(settings, 'SELECT tx_id, seq FROM labels'))
    assert seqs['seq-first'] < seqs['seq-second'], seqs


def test_wait_for_scorer_needs_a_fresh_heartbeat_that_names_partitions(settings):
    "`fraud-nb produce --wait-for-scorer`: an older heartbeat or one without partitions does not count; a newer one with partitions does; without one the producer starts anyway after the wait, and says so."
    import psycopg2
    from fraud_nb.pg import pg_params
    from fraud_nb.health import wait_for_scorer
    conn = psycopg2.connect(**pg_params(settings.database_url)); conn.autocommit = True
    def heartbeat(parts) -> object:
        with conn.cursor() as cur:
            cur.execute("""INSERT INTO scorer_stats (scorer_id, interval_s, processed, dead_letters, flagged, partitions)
                           VALUES ('s', 1, 0, 0, 0, %s::integer[]) RETURNING ts""", (parts,))
            return cur.fetchone()[0]
    try:
        heartbeat([0, 1])                                            # older than the wait: does not count
        assert wait_for_scorer(settings, 1.0, interval=0.2) is None
        since = heartbeat([])                                        # new, but owns nothing
        assert wait_for_scorer(settings, 1.0, since=since, interval=0.2) is None
        heartbeat([2, 3])
        waited = wait_for_scorer(settings, 30.0, since=since, interval=0.2)
        assert waited is not None, waited
    finally: conn.close()
    r = subprocess.run(fraud_nb_cmd('produce', '--synthetic', '500', '--n', '20', '--no-labels', '--wait-for-scorer', '1'),
                       env=service_env(settings), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'no scorer owned partitions after 1 s: producing anyway' in r.stdout, r.stdout + r.stderr
    assert 'sent 20 transactions' in r.stdout
