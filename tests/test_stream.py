"The message contracts, the producer (`fraud-nb produce`) and the label sink (`fraud-nb labels`) against the real embedded broker."
import json, random, subprocess, time

import numpy as np
import pytest

from fraud_nb.data import RAW_COLUMNS
from fraud_nb.stream import (NUMERIC_FIELDS, MAX_MESSAGE_BYTES, check_transaction, decode_transactions, encode_transactions,
                             parse_event_times, iso_utc)
from conftest import service_env, fraud_nb_cmd
from scorer_helpers import read_topic, query

GOOD = {'tx_id': 'ok-1', 'event_time': '2026-03-01T10:00:00.5Z', **{c: 1.25 for c in NUMERIC_FIELDS}}


def _msg(**kw):
    d = {**GOOD, **kw}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


MALFORMED = {
    'bad JSON': (b'{"tx_id": "x", "V1": ', 'bad JSON'),
    'not an object': (b'"just a string"', 'not a JSON object'),
    'missing field': (_msg(V17=...), 'missing field(s): V17'),
    'null field': (_msg(Amount=None), 'missing field(s): Amount'),
    'NaN': (_msg(V3=float('nan')), 'V3 is not finite'),
    'Infinity': (_msg(V4=float('inf')), 'V4 is not finite'),
    'string number': (_msg(Amount='12.50'), 'Amount must be a number, got str'),
    'boolean': (_msg(V9=False), 'V9 must be a number, got bool'),
    'nested': (_msg(V2=[1.0]), 'V2 must be a number, got list'),
    'huge int': (_msg(V5=10**400), 'V5 is too large'),
    'label leak': (_msg(Class=0), 'unexpected field(s) Class'),
    'bad tx_id': (_msg(tx_id='has space'), 'tx_id must be'),
    'numeric tx_id': (_msg(tx_id=17), 'tx_id must be'),
    'bad event_time': (_msg(event_time='31/02/2026'), 'event_time must be'),
    'oversize': (b'{"pad": "' + b'x' * MAX_MESSAGE_BYTES + b'"}', 'oversize'),
    'empty': (b'', 'empty message'),
    'not UTF-8': (b'{"tx_id": "\xff"}', 'not UTF-8'),
}


@pytest.mark.parametrize('name', sorted(MALFORMED))
def test_check_transaction_refuses_with_reason(name):
    value, needle = MALFORMED[name]
    rec, why = check_transaction(value)
    assert rec is None and needle in why, why


def test_decode_batch_agrees_with_the_reference_validator():
    "Random mixes of good and malformed messages: the vectorised path accepts exactly what check_transaction accepts, in order."
    rng = random.Random(0)
    bad = [v for v, _ in MALFORMED.values()]
    for trial in range(30):
        values, expect = [], []
        for i in range(rng.randint(1, 300)):
            if rng.random() < 0.15: v = rng.choice(bad)
            else: v = _msg(tx_id=f't{trial}-{i}', V1=rng.uniform(-5, 5), Amount=rng.choice([0, 1, 12.5, 1e6]))
            values.append(v); expect.append(check_transaction(v))
        d = decode_transactions(values)
        assert d.index.tolist() == [i for i, (r, _) in enumerate(expect) if r is not None]
        assert d.tx_id == [r['tx_id'] for r, _ in expect if r is not None]
        assert [i for i, _ in d.rejected] == [i for i, (r, _) in enumerate(expect) if r is None]
        assert [w for _, w in d.rejected] == [w for r, w in expect if r is None]
        if len(d):
            v1 = np.array([r['V1'] for r, _ in expect if r is not None])
            assert (d.values[:, NUMERIC_FIELDS.index('V1')] == v1).all()


def test_encode_decode_round_trip_is_exact():
    X = np.random.default_rng(1).normal(size=(1000, 30)) * 10.0 ** np.random.default_rng(2).integers(-8, 8, size=(1000, 30))
    d = decode_transactions(encode_transactions(X, [f'r-{i}' for i in range(1000)], iso_utc()))
    assert d.rejected == [] and (d.values == X).all()
    assert NUMERIC_FIELDS == RAW_COLUMNS and 'Class' not in NUMERIC_FIELDS


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
    from fraud_nb.stream import encode_label
    from fraud_nb.scorer import read_dead_letter
    p = Producer({'bootstrap.servers': settings.kafka_bootstrap})
    for i in range(500): p.produce(settings.topic_labels, encode_label(f'l-{i}', int(i % 10 == 0)), key=f'l-{i}')
    p.produce(settings.topic_labels, b'{"tx_id": "l-bad", "label": 7, "labeled_at": "2026-01-01T00:00:00Z"}', key='l-bad')
    p.produce(settings.topic_labels, encode_label('l-3', 1), key='l-3')  # a correction within the stream
    assert p.flush(10) == 0
    r = subprocess.run(fraud_nb_cmd('labels', '--stop-after', '502'), env=service_env(settings), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (n, pos, l3), = query(settings, "SELECT count(*), sum(label), (SELECT label FROM labels WHERE tx_id = 'l-3') FROM labels")
    assert (n, pos, l3) == (500, 51, 1)
    dead = [read_dead_letter(m) for m in read_topic(settings, settings.topic_dlq, 1)]
    assert len(dead) == 1 and dead[0]['key'] == b'l-bad' and 'label must be 0 or 1' in dead[0]['reason']
    assert dead[0]['topic'] == settings.topic_labels
