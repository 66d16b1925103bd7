"""Monitoring in the scorer, end to end on the real stack: a challenger registered mid-stream shadow-scores every transaction
from then on, exactly once; moving the alias stops it; a challenger that fails to vet is refused while the champion keeps
serving; the live feature counts (feature_rollup) add up to the rows scored, per minute and bin, also after a full replay."""
import re
from dataclasses import replace

import numpy as np

from fraud_nb.reload import signal_champion_changed
from scorer_helpers import (wait_for, query, scored_count, train_champion, start_scorer, stop, tail, check_exactly_once,
                            scorer_under_stream, register_mismatched)


def _shadow_count(s, version) -> int:
    return query(s, 'SELECT count(*) FROM shadow_scores WHERE model_version = %s', (version,))[0][0]


def check_feature_counts(s, version: str):
    """feature_rollup of `version` against the rows it scored: every feature's counts sum to the rows of each minute, and the
    score's counts are exactly the rows' probabilities binned over the reference's score edges."""
    from fraud_nb.drift import load_reference
    from fraud_nb.model import FEATURES
    ref = load_reference(s, version, FEATURES)
    assert ref is not None, f'version {version} has no reference.json'
    rows = dict(query(s, "SELECT date_trunc('minute', scored_at), count(*) FROM scored_transactions WHERE model_version = %s GROUP BY 1", (version,)))
    sums = query(s, 'SELECT bucket, feature, (SELECT sum(x) FROM unnest(counts) x), cardinality(counts) FROM feature_rollup WHERE model_version = %s', (version,))
    assert {f for _, f, _, _ in sums} == set(FEATURES) | {'__score__'}
    for bucket, feature, total, width in sums:
        assert total == rows[bucket], (bucket, feature, total, rows[bucket])
        k = len(ref['score_edges']) if feature == '__score__' else len(ref['edges'][FEATURES.index(feature)])
        assert width == k + 1, (feature, width, k)
    assert {b for b, *_ in sums} == set(rows)
    probs = query(s, "SELECT date_trunc('minute', scored_at), probability FROM scored_transactions WHERE model_version = %s", (version,))
    stored = {b: c for b, f, c in query(s, "SELECT bucket, feature, counts FROM feature_rollup WHERE model_version = %s AND feature = '__score__'", (version,))}
    for b in rows:
        p = np.array([x for bb, x in probs if bb == b])
        expect = np.bincount(np.searchsorted(ref['score_edges'], p, side='right'), minlength=len(ref['score_edges']) + 1)
        assert list(stored[b]) == expect.tolist(), b


def test_challenger_mid_stream(settings, tmp_path):
    """Mid-stream: v2 becomes challenger (signalled; polling off) -> from then on every scored transaction also has v2's shadow
    probability, exactly once, the same v2 gives offline; then the alias moves to a v3 that fails vetting: refused (logged once),
    v2's shadow scoring stops, v1 keeps serving, every transaction is scored exactly once; feature counts add up to the rows.
    Then a full replay (fresh group, v2 challenger again) adds no row, no count and no shadow score."""
    from fraud_nb import registry
    from fraud_nb.data import synthetic_transactions
    v1 = train_champion(settings, seed=3)
    s = replace(settings, model_poll_s=3600.0)          # only the notification can trigger a check
    log = tmp_path/'scorer.log'
    with scorer_under_stream(s, log, 200_000, rate=1500, seed=21, rows_first=1500) as (proc, prod):
        v2 = train_champion(s, seed=4, alias=None)
        registry.set_alias(s, 'challenger', v2)
        signal_champion_changed(s, v2)
        wait_for(lambda: _shadow_count(s, v2) > 1500, 60, f'shadow scores of v{v2}\n' + tail(log))
        v3 = register_mismatched(s)
        registry.set_alias(s, 'challenger', v3)
        signal_champion_changed(s, v3)
        wait_for(lambda: f'REFUSED model version {v3}' in log.read_text(errors='replace'), 60, 'the refusal of v3\n' + tail(log))
        signal_champion_changed(s, v3)                  # asked again: a refused version is not retried (nor logged again)
        n_at_refusal = scored_count(s)
        wait_for(lambda: scored_count(s) > n_at_refusal + 1500, 60, 'v1 to keep serving after the refusal\n' + tail(log))
        prod.r.stop(); prod.join(60)
        sent = prod.summary.sent
        assert prod.summary.failed == 0 and sent < 200_000
        wait_for(lambda: scored_count(s) >= sent, 120, f'all {sent} rows')
        assert stop(proc) == 0, tail(log)
    check_exactly_once(s, prod.ids[:sent])
    assert dict(query(s, 'SELECT model_version, count(*) FROM scored_transactions GROUP BY 1')) == {v1: sent}
    text = log.read_text(errors='replace')
    assert len(re.findall(f'REFUSED model version {v3}\\b', text)) == 1, 'a refused challenger is logged once'
    assert f'challenger version {v2} taken up for shadow scoring' in text and f'challenger alias left version {v2}' in text
    # shadow rows: only v2's, each of a scored transaction, once (the key), flagged by v2's own threshold
    sh = query(s, '''SELECT sh.model_version, count(*), count(t.tx_id), bool_and(sh.is_fraud = (sh.probability >= sh.threshold)),
                     min(sh.threshold), max(sh.threshold), bool_and(sh.scored_at = t.scored_at)
                     FROM shadow_scores sh LEFT JOIN scored_transactions t USING (tx_id) GROUP BY 1''')
    assert len(sh) == 1 and sh[0][0] == v2, sh
    _, n_shadow, n_joined, flags_ok, t_lo, t_hi, same_time = sh[0]
    assert n_shadow == n_joined > 1500 and flags_ok and same_time
    assert t_lo == t_hi == registry.load_version(s, v2).threshold
    # per partition, in offset order: no shadow score, then one on EVERY row, then none again (the alias left v2)
    for part, flags in query(s, '''SELECT t.kafka_partition, string_agg(CASE WHEN sh.tx_id IS NULL THEN '0' ELSE '1' END, '' ORDER BY t.kafka_offset)
                                   FROM scored_transactions t LEFT JOIN shadow_scores sh USING (tx_id) GROUP BY 1'''):
        assert re.fullmatch('0+1+0+', flags), f'partition {part}: shadow scores are not one unbroken run: {flags[:80]}...'
    # the shadow probabilities are v2's: recomputed offline for a sample
    sample = query(s, 'SELECT tx_id, probability FROM shadow_scores ORDER BY tx_id LIMIT 300')
    df = synthetic_transactions(200_000, seed=21, fraud_rate=0.01)
    pos = {t: i for i, t in enumerate(prod.ids)}
    offline = registry.load_version(s, v2).predict_proba(df.iloc[[pos[t] for t, _ in sample]])
    np.testing.assert_allclose([p for _, p in sample], offline, rtol=1e-6)
    check_feature_counts(s, v1)
    assert query(s, 'SELECT count(*) FROM feature_rollup WHERE model_version <> %s', (v1,))[0][0] == 0
    # a full replay (a scorer in a fresh group, v2 challenger again): no row, no count, no shadow score is added twice
    before = query(s, 'SELECT tx_id, model_version, probability FROM shadow_scores ORDER BY 1')
    registry.set_alias(s, 'challenger', v2)
    r = replace(s, scorer_group=s.scorer_group + '-replay')
    log_r = tmp_path/'replay.log'
    proc = start_scorer(r, log_r, '--stop-after', str(sent), '--id', 'replay')
    try: assert proc.wait(180) == 0, tail(log_r)
    finally: stop(proc)
    text = log_r.read_text(errors='replace')
    assert 'holds already written transaction(s) (a replay)' in text and f'challenger version {v2} taken up for shadow scoring' in text
    assert f'{sent} scored (0 new rows)' in text, tail(log_r)
    check_exactly_once(s, prod.ids[:sent])
    check_feature_counts(s, v1)
    assert query(s, 'SELECT tx_id, model_version, probability FROM shadow_scores ORDER BY 1') == before
