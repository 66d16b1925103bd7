"The streaming scorer end to end, as `fraud-nb score` processes on the real embedded stack."
import json
from dataclasses import replace

import pytest

from fraud_nb.contracts import NUMERIC_FIELDS, MAX_MESSAGE_BYTES, read_dead_letter
from fraud_nb.pg import copy_rows
from scorer_helpers import (wait_for, query, scored_count, train_champion, produce, send_raw, read_topic, start_scorer, stop,
                            tail, check_exactly_once, wait_consuming, assigned_partitions)

GOOD = {'tx_id': 'x', 'event_time': '2026-03-01T10:00:00Z', **{c: 0.5 for c in NUMERIC_FIELDS}}
def _bad(**kw):
    d = {**GOOD, **kw}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()

MALFORMED = [  # (value, expected words in the reason)
    (b'{"tx_id": "b-1", "V1": 0.1,', 'bad JSON'),
    (_bad(tx_id='b-2', V11=...), 'missing field(s): V11'),
    (_bad(tx_id='b-3', V3=float('nan')), 'V3 is not finite'),
    (_bad(tx_id='b-4', Amount='99.90'), 'Amount must be a number'),
    (b'{"tx_id": "b-5", "pad": "' + b'y' * (MAX_MESSAGE_BYTES + 10) + b'"}', 'oversize'),
    (_bad(tx_id='b-6', Class=1), 'unexpected field(s) Class'),
    (_bad(tx_id='b 7'), 'tx_id must be'),
    (None, 'empty message'),
    (_bad(tx_id='b-9', V20=True), 'V20 must be a number'),
    (_bad(tx_id='b-10', event_time='not a time'), 'event_time must be'),
]


def test_scorer_end_to_end_with_malformed_messages(settings, tmp_path):
    "3,000 valid + 10 malformed messages: each valid tx_id once with probability and version; each malformed one in the DLQ with its reason."
    v1 = train_champion(settings)
    ids = produce(settings, 1500, seed=1)
    send_raw(settings, [v for v, _ in MALFORMED], keys=[f'bad-{i}' for i in range(len(MALFORMED))])
    ids += produce(settings, 1500, seed=2)
    total = len(ids) + len(MALFORMED)
    log = tmp_path/'scorer.log'
    s = replace(settings, stats_interval_s=1.0)
    proc = start_scorer(s, log, '--stop-after', str(total), '--report', str(tmp_path/'report.json'))
    try: assert proc.wait(180) == 0, tail(log)
    finally: stop(proc)
    check_exactly_once(settings, ids)
    (versions,), = query(settings, 'SELECT array_agg(DISTINCT model_version) FROM scored_transactions')
    assert versions == [v1]
    # the stored features are the message's, exactly
    (feat, amount, t), = query(settings, 'SELECT features, amount, tx_time FROM scored_transactions ORDER BY kafka_partition, kafka_offset LIMIT 1')
    assert len(feat) == 28 and amount >= 0 and t >= 0
    # dead letters: original bytes, reason, source partition and offset
    dead = [read_dead_letter(m) for m in read_topic(settings, settings.topic_dlq, len(MALFORMED))]
    assert len(dead) == len(MALFORMED), [d['reason'] for d in dead]
    by_key = {d['key'].decode(): d for d in dead}
    for i, (value, needle) in enumerate(MALFORMED):
        d = by_key[f'bad-{i}']
        assert d['value'] == value and needle in d['reason'], (i, d['reason'])
        assert d['topic'] == settings.topic_transactions and d['partition'] is not None and d['offset'] is not None
    # alerts: one per flagged row at least (at-least-once), with reasons
    (flagged,), = query(settings, 'SELECT count(*) FROM scored_transactions WHERE is_fraud')
    assert flagged > 0
    alerts = [json.loads(m.value()) for m in read_topic(settings, settings.topic_alerts, flagged)]
    flagged_ids = {r[0] for r in query(settings, 'SELECT tx_id FROM scored_transactions WHERE is_fraud')}
    assert {a['tx_id'] for a in alerts} == flagged_ids
    a = alerts[0]
    assert a['model_version'] == v1 and a['probability'] >= a['threshold'] and a['top_reasons'] and a['scored_at']
    # statistics and the summary
    (processed, dead_n, p99, version), = query(settings, 'SELECT sum(processed), sum(dead_letters), max(p99_ms), max(model_version) FROM scorer_stats')
    assert (processed, dead_n, version) == (len(ids), len(MALFORMED), v1) and p99 > 0
    report = json.loads((tmp_path/'report.json').read_text())
    assert (report['handled'], report['processed'], report['dead_letters'], report['inserted']) == (total, len(ids), len(MALFORMED), len(ids))
    # a replay of everything (another group reads the topic from the start) changes nothing: no row, no rollup count
    proc = start_scorer(replace(settings, scorer_group=settings.scorer_group + '-replay'), tmp_path/'replay.log',
                        '--stop-after', str(total), '--report', str(tmp_path/'replay.json'))
    try: assert proc.wait(180) == 0, tail(tmp_path/'replay.log')
    finally: stop(proc)
    replay = json.loads((tmp_path/'replay.json').read_text())
    assert (replay['processed'], replay['inserted']) == (len(ids), 0)
    check_exactly_once(settings, ids)


def test_copy_rows_with_mixed_id_lengths_round_trips(settings):
    "The binary COPY path when ids differ in length (the per-row branch) stores the same values, stamped with the write time."
    import io
    import numpy as np
    from fraud_nb.pg import pg_connect
    from fraud_nb.scorer_db import STAGE_DDL, STAGE_TABLE, STAGE_COPY_SQL
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 30)); ids = ['a', 'bb-22', 'c' * 128]
    rows = copy_rows(np.array([0, 1, 2]), np.array([5, 6, 7]), np.array([1_700_000_000_000_000] * 3), np.array([0, 1, 2]),
                     X, np.array([0.1, 0.5, 0.9]), np.array([False, True, True]), ids, threshold=0.4, version='12', model_ms=0.25,
                     scorer_id='scorer-é')
    assert rows.ids is not None       # the per-row branch
    conn = pg_connect(settings.database_url)
    with conn.cursor() as cur:
        cur.execute(STAGE_DDL)
        cur.copy_expert(STAGE_COPY_SQL, io.BytesIO(rows.payload(1_700_000_000_500_000)))
        cur.execute(f"SELECT tx_id, kafka_partition, kafka_offset, tx_time, amount, features, probability, is_fraud, "
                    f"extract(epoch FROM kafka_ts), extract(epoch FROM event_time), threshold, model_version, model_ms, scorer_id, "
                    f"extract(epoch FROM scored_at), latency_ms FROM {STAGE_TABLE} ORDER BY kafka_offset")
        got = cur.fetchall()
    conn.rollback(); conn.close()
    assert [r[0] for r in got] == ids and [r[1] for r in got] == [0, 1, 2] and [r[2] for r in got] == [5, 6, 7]
    for r, x in zip(got, X):
        assert r[3] == x[0] and r[4] == x[-1] and r[5] == list(x[1:29])
    assert [r[6] for r in got] == [0.1, 0.5, 0.9] and [r[7] for r in got] == [False, True, True]
    assert float(got[0][8]) == 1_700_000_000 and float(got[2][9]) == 2e-6
    assert {r[10:14] for r in got} == {(0.4, '12', 0.25, 'scorer-é')}
    assert {(float(r[14]), r[15]) for r in got} == {(1_700_000_000.5, 500.0)}


def test_two_replicas_share_the_partitions(settings, tmp_path):
    "Two scorers in one group on the 4-partition topic: each gets two partitions and scores its share; every tx exactly once."
    assert settings.partitions == 4
    train_champion(settings)
    logs = [tmp_path/'a.log', tmp_path/'b.log']
    procs = [start_scorer(settings, logs[0], '--id', 'replica-a')]
    try:
        wait_consuming(logs[0], 4)
        procs.append(start_scorer(settings, logs[1], '--id', 'replica-b'))
        wait_for(lambda: all(len(assigned_partitions(l) or []) == 2 for l in logs), 90, 'the group to rebalance 2 + 2')
        latest = lambda: dict(query(settings, 'SELECT DISTINCT ON (scorer_id) scorer_id, partitions FROM scorer_stats ORDER BY scorer_id, ts DESC'))
        wait_for(lambda: sorted(sum(latest().values(), [])) == [0, 1, 2, 3] and all(len(v) == 2 for v in latest().values()), 30,
                 'each replica to name its two partitions in a heartbeat (written at assignment)')
        ids = produce(settings, 4000, seed=5)
        wait_for(lambda: scored_count(settings) >= 4000, 120, 'all 4,000 rows')
        for p in procs: assert stop(p) == 0
    finally:
        for p in procs: stop(p)
    check_exactly_once(settings, ids)
    share = dict(query(settings, 'SELECT scorer_id, count(*) FROM scored_transactions GROUP BY 1'))
    assert set(share) == {'replica-a', 'replica-b'} and min(share.values()) > 0, share
    parts = dict(query(settings, 'SELECT scorer_id, array_agg(DISTINCT kafka_partition) FROM scored_transactions GROUP BY 1'))
    assert not set(parts['replica-a']) & set(parts['replica-b']), parts


@pytest.mark.slow
def test_bench_reports_every_figure():
    "A small `fraud-nb bench --json` (CI never runs the full 200,000): every figure present and consistent."
    import os, subprocess
    from conftest import fraud_nb_cmd
    r = subprocess.run(fraud_nb_cmd('bench', '--n', '10000', '--baseline-n', '200', '--steady-s', '4', '--train-n', '20000', '--c-runs', '2', '--d-runs', '2', '--json'),
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'MLFLOW_DISABLE_TELEMETRY': 'true'})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    a, b, c, d = res['a_raw_consume'], res['b_per_message'], res['c_scorer'], res['d_latency']
    assert a['messages'] == 10_000 and a['steady_rate'] > 0 and a['wall_rate'] > 0
    assert b['messages'] == 200 and b['steady_rate'] > 0
    assert c['rows_written'] == c['offsets_committed'] == 10_000 and c['steady_rate'] > 0 and c['peak_rss_mb'] > 50
    assert len(c['runs_wall']) == 2 and c['wall_rate'] == min(c['runs_wall'])   # of two runs, the median rule takes the lower
    assert 0 < d['p50_ms'] <= d['p95_ms'] <= d['p99_ms'] and d['messages'] > 0 and d['peak_rss_mb'] > 50
    assert len(d['runs_p99_ms']) == 2 and d['p99_ms'] == min(d['runs_p99_ms'])             # (d) too: the median of two is the lower
    assert set(res['ratios']) == {'c_over_a_steady', 'c_over_a_wall', 'c_over_b'}
    # monitoring: the same run, plain (--no-monitor), with feature counts, with counts and a shadow challenger
    m = res['monitoring']
    assert set(m) == {'plain_tx_per_s', 'monitor_tx_per_s', 'shadow_tx_per_s', 'monitor_ratio', 'shadow_ratio', 'monitor_ratio_wall', 'shadow_ratio_wall'}
    assert m['plain_tx_per_s'] == c['steady_rate'] and m['monitor_tx_per_s'] == res['c_monitor']['steady_rate'] > 0 and m['shadow_tx_per_s'] > 0
    assert res['c_scorer']['monitoring'] == {'enabled': False}
    assert res['c_monitor']['monitoring']['enabled'] and res['c_monitor']['monitoring']['challenger'] is None
    assert res['c_shadow']['monitoring']['challenger'] == '2' and res['c_shadow']['monitoring']['shadow_batches'] > 0
    assert all(r['rows_written'] == 10_000 for r in (res['c_monitor'], res['c_shadow']))
    raw = res['raw_events']
    assert len(raw['runs_p99_ms']) == 2 and raw['p99_ms'] == min(raw['runs_p99_ms']) and raw['tx_per_s'] > 0 and raw['ratio_to_prefeaturized'] > 0
    assert len(res['targets']) == (6 if res.get('raw_events') else 4) and all(isinstance(v, bool) for v in res['targets'].values())   # + monitoring, + the raw-event pair
