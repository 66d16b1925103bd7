"""Monitoring on the raw-event path (features computed inside the scorer from the card state): the live feature counts are
the stored feature rows binned over the champion's reference, a raw-event challenger shadow-scores every transaction, and a
challenger of another feature set is refused for shadow scoring (logged once) while the champion serves."""
from dataclasses import replace

import numpy as np

from fraud_nb.reload import signal_champion_changed
from scorer_helpers import (wait_for, query, scored_count, start_scorer, stop, tail, wait_consuming, train_raw_model,
                            train_champion, with_reference)


def test_raw_events_counts_and_shadow(settings, tmp_path):
    from fraud_nb import registry
    from fraud_nb.drift import load_reference, Binner
    from fraud_nb.features import RAW_EVENTS
    from fraud_nb.simulator import simulate
    from fraud_nb.stream import RawReplayer, raw_passes
    m = train_raw_model(seed=11)
    v1 = with_reference(settings, registry.register_model(m, settings, metrics={}, alias='champion'), m)
    v2 = registry.register_model(m, settings, metrics={}, alias='challenger')   # its twin: its shadow scores = the champion's
    s = replace(settings, model_poll_s=3600.0)
    log = tmp_path/'scorer.log'
    proc = start_scorer(s, log)
    try:
        wait_consuming(log)
        wait_for(lambda: f'model version {v2} loaded and vetted' in log.read_text(errors='replace'), 60, 'the challenger loaded\n' + tail(log))
        h = simulate(days=3, customers=300, terminals=400, seed=5)
        RawReplayer(s, raw_passes(h), rate=0, labels=False, prefix='m').run()
        wait_for(lambda: scored_count(s) >= len(h), 90, f'{len(h)} raw events scored\n' + tail(log))
        # a prefeaturized challenger: it cannot take the raw-event feature matrix; refused for shadow scoring, logged once
        v3 = train_champion(s, seed=3, alias='challenger')
        signal_champion_changed(s, v3)
        wait_for(lambda: f'model version {v3} loaded and vetted' in log.read_text(errors='replace'), 60, 'v3 loaded\n' + tail(log))
        passes = raw_passes(h, loop=True); next(passes)          # the same history moved after the first pass in time
        RawReplayer(s, [next(passes)], rate=0, labels=False, prefix='n').run()
        wait_for(lambda: scored_count(s) >= 2 * len(h), 90, 'the second pass scored\n' + tail(log))
        assert f'REFUSED challenger version {v3} for shadow scoring' in log.read_text(errors='replace'), tail(log)
    finally:
        assert stop(proc) == 0, tail(log)
    n = len(h)
    assert dict(query(s, 'SELECT model_version, count(*) FROM scored_transactions GROUP BY 1')) == {v1: 2 * n}
    assert log.read_text(errors='replace').count(f'REFUSED challenger version {v3} for shadow scoring') == 1
    # every row of the first pass (and none of the second) has v2's shadow score; none from v3
    assert dict(query(s, 'SELECT model_version, count(*) FROM shadow_scores GROUP BY 1')) == {v2: n}
    assert query(s, "SELECT count(*) FROM shadow_scores sh JOIN scored_transactions t USING (tx_id) WHERE t.tx_id LIKE 'm.%%'")[0][0] == n
    assert query(s, "SELECT count(*) FROM scored_transactions WHERE tx_id LIKE 'n.%%'")[0][0] == n
    # the twin scored exactly the matrix the champion scored (what the raw path computed inside): the same probabilities
    (diff,), = query(s, 'SELECT max(abs(sh.probability - t.probability)) FROM shadow_scores sh JOIN scored_transactions t USING (tx_id)')
    assert diff < 1e-9, diff
    # the counts are the stored feature rows (what the champion scored) binned over v1's reference
    ref = load_reference(s, v1, list(RAW_EVENTS.features))
    rows = query(s, 'SELECT features, probability FROM scored_transactions')
    b = Binner(ref)
    expect = b.rows(b.counts(b.index(np.array([r[0] for r in rows], np.float64), np.array([r[1] for r in rows]))))
    got = {f: np.zeros(len(c), np.int64) for f, c in expect}
    for f, c in query(s, 'SELECT feature, counts FROM feature_rollup WHERE model_version = %s', (v1,)): got[f] += np.array(c)
    for f, c in expect: assert got[f].tolist() == c, f
    assert sum(expect[0][1]) == 2 * n
