"Hot reload: the champion moves mid-stream and the scorer swaps models between batches; a mismatched model is refused."
import json, threading
from dataclasses import replace

import pytest

from fraud_nb.reload import ModelWatcher, signal_champion_changed, vet_model
from scorer_helpers import (wait_for, query, scored_count, train_champion, stop, tail, check_exactly_once, scorer_under_stream,
                            register_mismatched)


class FakeSource:
    "A model source whose champion and models the test controls."
    def __init__(self, models): self.models, self.champion, self.loads = models, None, []
    def champion_version(self): return self.champion
    def load(self, v):
        self.loads.append(v)
        m = self.models[v]
        if isinstance(m, Exception): raise m
        return m


@pytest.fixture(scope='module')
def small_models():
    "Two compatible models and one trained on another feature list (same booster, declared features differ)."
    from fraud_nb.data import synthetic_transactions, time_split
    from fraud_nb.model import train_model, FraudModel
    tr, va, _ = time_split(synthetic_transactions(10_000, seed=1, fraud_rate=0.02))
    a = train_model(tr, va, n_estimators=10, seed=1); a.version = '1'
    b = train_model(tr, va, n_estimators=12, seed=2); b.version = '2'
    bad = FraudModel(b.booster, b.features[:-1], '0', b.threshold, version='3')
    return a, b, bad


def test_watcher_swaps_between_batches_and_refuses_bad_models(settings, small_models):
    a, b, bad = small_models
    src = FakeSource({'1': a, '2': b, '3': bad, '4': ConnectionError('artifact store down')})
    w = ModelWatcher(replace(settings, model_poll_s=0.2), src, listen=False)
    stop_event = threading.Event()
    threading.Timer(0.5, lambda: setattr(src, 'champion', '1')).start()
    assert w.wait_for_champion(stop_event) and w.take() is a
    src.champion = '2'
    assert w.check() and w.current is a and w.take() is b and w.take() is b   # swapped at take(), once
    src.champion = '3'
    assert not w.check() and w.take() is b and '3' in w.refused and 'features' in w.refused['3']
    assert not w.check() and src.loads.count('3') == 1                          # a refused version is not reloaded
    src.champion = '4'                                                           # a load failure is transient: retried
    assert not w.check() and not w.check() and src.loads.count('4') == 2 and '4' not in w.refused and w.take() is b
    src.champion = '1'                                                           # rolling back is a move like any other
    assert w.check() and w.take() is a
    stop_event.set()
    assert not ModelWatcher(settings, FakeSource({}), listen=False).wait_for_champion(stop_event)


def test_vet_model_checks_features_and_predictions(small_models):
    a, _, bad = small_models
    vet_model(a)
    with pytest.raises(ValueError, match='features'): vet_model(bad)


_register_mismatched = register_mismatched


def test_champion_moves_mid_stream(settings, tmp_path):
    """Promote v2 mid-stream (signalled by NOTIFY; polling is off): rows before carry v1, rows after v2, nothing lost.
    Then promote a v3 with a mismatched feature list: refused, v2 keeps serving."""
    from fraud_nb import registry
    v1 = train_champion(settings, seed=3)
    s = replace(settings, model_poll_s=3600.0)          # only the notification can trigger a reload
    log = tmp_path/'scorer.log'
    with scorer_under_stream(s, log, 200_000, rate=1500, seed=21, rows_first=2000) as (proc, prod):
        v2 = train_champion(s, seed=4, alias=None)
        registry.set_alias(s, 'champion', v2)
        signal_champion_changed(s, v2)
        wait_for(lambda: query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v2,))[0][0] > 0, 60,
                 f'rows scored by v{v2}\n' + tail(log))
        v3 = _register_mismatched(s)
        registry.set_alias(s, 'champion', v3)
        signal_champion_changed(s, v3)
        wait_for(lambda: f'REFUSED model version {v3}' in log.read_text(errors='replace'), 60, 'the refusal of v3\n' + tail(log))
        n_v2_at_refusal = query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v2,))[0][0]
        wait_for(lambda: query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v2,))[0][0] > n_v2_at_refusal + 500,
                 60, 'v2 to keep serving after the refusal')
        prod.r.stop(); prod.join(60)
        sent = prod.summary.sent
        assert prod.summary.failed == 0 and sent < 200_000
        wait_for(lambda: scored_count(s) >= sent, 120, f'all {sent} rows')
        assert stop(proc) == 0, tail(log)
    check_exactly_once(s, prod.ids[:sent])
    counts = dict(query(s, 'SELECT model_version, count(*) FROM scored_transactions GROUP BY 1'))
    assert set(counts) == {v1, v2} and counts[v1] >= 2000, counts
    # within each partition, in offset order: v1 ... v1 v2 ... v2 (one swap, between batches, never back)
    for part, versions in query(s, 'SELECT kafka_partition, array_agg(model_version ORDER BY kafka_offset) FROM scored_transactions GROUP BY 1'):
        first_v2 = versions.index(v2) if v2 in versions else len(versions)
        assert set(versions[:first_v2]) <= {v1} and set(versions[first_v2:]) <= {v2}, f'partition {part} mixes versions after the swap'
    text = log.read_text(errors='replace')
    assert 'champion change signalled' in text and f'now serving model version {v2}' in text
    assert f'now serving model version {v3}' not in text
