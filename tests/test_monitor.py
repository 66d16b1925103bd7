"""fraud_nb.monitor against the real PostgreSQL and MLflow store: drift verdicts of a stream drawn from the training
distribution and of drifted transactions, `fraud-nb monitor --json`, and live quality per version and the shadow
comparison checked against scikit-learn on hand-built rows."""
import json, subprocess
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.metrics import average_precision_score, precision_score, recall_score

from conftest import fraud_nb_cmd, service_env
from fraud_nb import db, monitor
from fraud_nb.data import synthetic_transactions, time_split
from fraud_nb.model import make_features, train_model
from fraud_nb import registry

DRIFTED = {'log_amount', *monitor.DRIFTED_V}


def _bins(edges, x): return np.bincount(np.searchsorted(edges, x, side='right'), minlength=len(edges) + 1)


def _reference(X, names, probs) -> dict:
    "A decile reference in the agreed format (used only when the registry does not log one yet)."
    e = lambda x: np.unique(np.quantile(x, np.arange(1, 10) / 10)).tolist()
    edges, se = [e(X[:, j]) for j in range(X.shape[1])], e(probs)
    return {'version': 1, 'features': list(names), 'edges': edges, 'counts': [_bins(ed, X[:, j]).tolist() for j, ed in enumerate(edges)],
            'score_edges': se, 'score_counts': _bins(se, probs).tolist()}


def champion_with_reference(settings):
    "A small champion with its training reference logged as reference.json; returns (version, model, reference)."
    tr, va, _ = time_split(synthetic_transactions(20_000, seed=3, fraud_rate=0.01))
    model = train_model(tr, va, n_estimators=30, seed=3)
    version = registry.register_model(model, settings, metrics={}, alias='champion')
    ref = monitor.load_reference(settings, version)
    if ref is None:     # the registry does not log references yet: log the model's own (or, without one, the agreed format)
        X = make_features(tr)
        ref = getattr(model, 'reference', None) or _reference(X, model.features, model.predict_proba_features(X))
        mv = registry._client(settings).get_model_version(settings.model_name, version)
        registry._client(settings).log_dict(mv.run_id, ref, 'reference.json')
        monitor._REFERENCES.clear()
    return version, model, ref


@pytest.fixture
def champion(settings): return champion_with_reference(settings)


def write_rollup(engine, version, model, ref, df):
    "The scorer's per-minute rollup rows for the transactions of `df`, in the current minute (added to what is there)."
    X = make_features(df)
    p = model.predict_proba_features(X)
    rows = [{'f': f, 'c': _bins(e, X[:, j]).tolist()} for j, (f, e) in enumerate(zip(ref['features'], ref['edges']))]
    rows.append({'f': monitor.SCORE, 'c': _bins(ref['score_edges'], p).tolist()})
    with engine.begin() as c:
        for r in rows:
            c.execute(sa.text('''INSERT INTO feature_rollup (bucket, model_version, feature, counts)
                                 VALUES (date_trunc('minute', now()), :v, :f, :c)
                                 ON CONFLICT (bucket, model_version, feature) DO UPDATE SET counts =
                                   (SELECT array_agg(a + b ORDER BY i) FROM unnest(feature_rollup.counts, EXCLUDED.counts) WITH ORDINALITY u(a, b, i))'''),
                      {'v': version, **r})


def _clear(engine):
    with engine.begin() as c: c.execute(sa.text('DELETE FROM feature_rollup'))


def test_stable_stream_then_drifted_transactions(settings, champion, capsys):
    version, model, ref = champion
    eng = db.make_engine(settings.database_url)
    try:
        # too few transactions: no verdict at all, not noise
        write_rollup(eng, version, model, ref, synthetic_transactions(200, seed=7, fraud_rate=0.01))
        r = monitor.monitor_report(eng, settings, 3600)
        assert r['champion'] == version and {e['verdict'] for e in r['features']} == {'too few'}, r['features']
        # a stream from the training distribution: every feature stable
        _clear(eng)
        write_rollup(eng, version, model, ref, synthetic_transactions(3000, seed=7, fraud_rate=0.01))
        r = monitor.monitor_report(eng, settings, 3600)
        assert r['n'] == 3000 and len(r['features']) == len(model.features)
        assert {e['name']: e['verdict'] for e in r['features'] if e['verdict'] not in ('stable', 'seasonal')} == {}, r['features']
        assert r['score_verdict'] == 'stable' and r['drifted'] == []
        # drifted transactions, one window: the drifted features are named, worst first, and the rest stay stable
        _clear(eng)
        write_rollup(eng, version, model, ref, monitor.drift_transactions(synthetic_transactions(3000, seed=8, fraud_rate=0.01)))
        r = monitor.monitor_report(eng, settings, 3600)
        named = set(r['drifted'])
        assert DRIFTED <= named, r['features']
        head = [e['name'] for e in r['features'][:len(named - {monitor.SCORE})]]
        assert set(head) == named - {monitor.SCORE}
        untouched = {f'V{i}' for i in range(1, 29)} - set(monitor.DRIFTED_V)
        assert all(e['verdict'] == 'stable' for e in r['features'] if e['name'] in untouched), r['features']
        psis = [e['psi'] for e in r['features'] if e['verdict'] == 'drifted']
        assert psis == sorted(psis, reverse=True)
        # the retraining report's drift since the champion was registered sees the same
        rep = monitor.drift_report(eng, settings)
        assert DRIFTED <= set(rep[rep.verdict == 'drifted'].name) and rep.attrs['version'] == version
    finally: eng.dispose()

    # fraud-nb monitor --json: the keys of issue 15, for the last window
    out = subprocess.run(fraud_nb_cmd('monitor', '--window', '1h', '--json'), env=service_env(settings), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    j = json.loads(out.stdout)
    assert {'features', 'score_psi', 'versions', 'shadow', 'drifted'} <= set(j)
    assert all(set(e) >= {'name', 'psi', 'verdict'} for e in j['features']) and DRIFTED <= set(j['drifted'])
    capsys.readouterr()
    assert monitor.monitor_main([], settings=settings) == 0
    text = capsys.readouterr().out
    assert 'DRIFTED' in text and 'log_amount' in text, text
    assert monitor.monitor_main(['--window', 'soon'], settings=settings) == 2 and 'not a duration' in capsys.readouterr().err


def _insert_scored(engine, rows):
    with engine.begin() as c:
        c.execute(sa.text('''INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold,
                                                              model_version, scored_at, kafka_partition, kafka_offset, scorer_id)
                             VALUES (:tx, now(), 0, 1, ARRAY[0.0]::float8[], :p, :p >= :t, :t, :v, now() - :age * interval '1 s', 0, :o, 's')'''),
                  [dict(r, o=i) for i, r in enumerate(rows)])
        c.execute(sa.text('INSERT INTO labels (tx_id, label, labeled_at) VALUES (:tx, :y, now())'), [r for r in rows if r['y'] is not None])


def _sk(rows, p='p', t='t'):
    y, s = np.array([r['y'] for r in rows]), np.array([r[p] for r in rows])
    d = s >= np.array([r[t] for r in rows])
    return {'precision': precision_score(y, d), 'recall': recall_score(y, d), 'average_precision': average_precision_score(y, s), 'labels': len(y)}


def _close(got, want):
    for k in ('precision', 'recall', 'average_precision'): assert got[k] == pytest.approx(want[k], abs=1e-6), (k, got, want)
    assert got['labels'] == want['labels']


def test_quality_per_version_and_shadow_against_sklearn(settings):
    s = replace(settings, label_delay_s=60)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(900):
        y = int(rng.random() < 0.1)
        v, age = ('1', 400) if i < 500 else ('2', 200)          # two versions, both matured (older than the 60 s delay)
        p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2))      # rounded: tied scores, as sklearn handles them
        rows.append({'tx': f'm{i}', 'p': p, 't': 0.5, 'v': v, 'age': age, 'y': y, 'shadow': float(np.clip(p + rng.normal(0, .15), 0, 1))})
    fresh = [{'tx': f'f{i}', 'p': 0.9, 't': 0.5, 'v': '2', 'age': 5, 'y': 0, 'shadow': 0.9} for i in range(50)]   # not matured
    old = [{'tx': f'o{i}', 'p': 0.9, 't': 0.5, 'v': '1', 'age': 4000, 'y': 0, 'shadow': 0.9} for i in range(50)]  # before the window
    unlabeled = [{'tx': f'u{i}', 'p': 0.9, 't': 0.5, 'v': '1', 'age': 300, 'y': None, 'shadow': 0.9} for i in range(30)]
    eng = db.make_engine(s.database_url)
    try:
        _insert_scored(eng, rows + fresh + old + unlabeled)
        shadowed = [r for r in rows if int(r['tx'][1:]) % 3 != 0] + fresh + unlabeled   # the challenger saw part of the traffic
        with eng.begin() as c:
            c.execute(sa.text('''INSERT INTO shadow_scores (tx_id, model_version, probability, is_fraud, threshold, scored_at)
                                 VALUES (:tx, '3', :shadow, :shadow >= 0.4, 0.4, now() - :age * interval '1 s')'''), shadowed)
        with eng.connect() as c: q = {x['version']: x for x in monitor.live_quality(c, s, 3600)}
        assert set(q) == {'1', '2'}
        _close(q['1'], _sk([r for r in rows if r['v'] == '1']))
        _close(q['2'], _sk([r for r in rows if r['v'] == '2']))

        same = [r for r in shadowed if r in rows]     # matured, labelled, in the window
        ev = monitor.shadow_evidence(eng, s, '3')
        assert ev['n'] == len(same) and ev['served'] == ['1', '2']
        _close(ev['champion'], _sk(same))
        _close(ev['challenger'], _sk([dict(r, t=0.4) for r in same], p='shadow'))
        assert ev['ap_difference'] == pytest.approx(ev['challenger']['average_precision'] - ev['champion']['average_precision'], abs=1e-5)

        r = monitor.monitor_report(eng, s, 3600)
        assert [x['version'] for x in r['shadow']] == ['3'] and r['shadow'][0]['n'] == len(same)
        assert {x['version']: x['labels'] for x in r['versions']} == {'1': 500, '2': 400}
        assert all(set(x) >= {'precision', 'recall', 'average_precision', 'labels'} for x in r['versions'])
        assert r['features'] == [] and 'note' in r          # no champion in this registry: no drift, said so
    finally: eng.dispose()
