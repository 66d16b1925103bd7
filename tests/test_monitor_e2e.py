"""Monitoring end to end with the real scorer: `fraud-nb score` counts the features of what it scores (feature_rollup) and
scores a shadow challenger (shadow_scores), `fraud-nb labels` stores the labels; fraud_nb.monitor reads them back.
A stream from the training distribution: every verdict stable, quality per version and the shadow comparison equal to
scikit-learn on the stored rows. Drifted transactions (`drift_transactions`, what `fraud-nb produce --drift` sends): the
drifted features named within one window."""
import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_score, recall_score

from scorer_helpers import query, scored_count, start_labels, start_scorer, stop, tail, train_champion, wait_consuming, wait_for
from fraud_nb import db, monitor, registry
from fraud_nb.data import synthetic_transactions
from fraud_nb.stream import Replayer

N = 3000
DRIFTED = {'log_amount', *monitor.DRIFTED_V}


def _send(settings, df, tmp_path, total: int, labels: bool):
    "Replay `df` to the running scorer (and label sink); wait until `total` rows, labels and score counts are stored."
    r = Replayer(settings, df if labels else df.drop(columns=['Class']), rate=0, label_delay_s=0)
    s = r.run(progress=False)
    assert s.delivered == len(df) and s.failed == 0, s.line()
    wait_for(lambda: scored_count(settings) >= total, 120, f'{total} rows scored\n' + tail(tmp_path/'scorer.log'))
    if labels: wait_for(lambda: query(settings, 'SELECT count(*) FROM labels')[0][0] >= total, 120, 'every label stored\n' + tail(tmp_path/'labels.log'))
    # the rollup of a batch is written with its rows: every row counted once
    wait_for(lambda: query(settings, "SELECT coalesce(sum(x), 0) FROM feature_rollup, unnest(counts) x WHERE feature = '__score__'")[0][0]
                     == total, 30, 'the score counts of every row')


def _sk(rows):
    p, d, y = (np.array(c) for c in zip(*rows))
    return {'precision': precision_score(y, d), 'recall': recall_score(y, d), 'average_precision': average_precision_score(y, p), 'labels': len(y)}


def _close(got, want):
    for k in ('precision', 'recall', 'average_precision'): assert got[k] == pytest.approx(want[k], abs=1e-6), (k, got, want)
    assert got['labels'] == want['labels']


def test_monitoring_with_a_real_scorer(settings, tmp_path, capsys):
    """v1 serves, v2 is the shadow challenger: a labelled stream from the training distribution is stable everywhere, and its quality
    and shadow comparison equal scikit-learn on the stored rows. Then v2 becomes champion and drifted transactions arrive: counted over
    v2's bins, the drifted features are named within one window."""
    s = replace(settings, label_delay_s=0.0, model_poll_s=1.0)
    v1 = train_champion(s, seed=3)
    v2 = train_champion(s, seed=4, alias=None)
    registry.set_alias(s, 'challenger', v2)
    scorer, sink = start_scorer(s, tmp_path/'scorer.log'), start_labels(s, tmp_path/'labels.log')
    try:
        wait_consuming(tmp_path/'scorer.log')
        wait_for(lambda: f'model version {v2} loaded and vetted' in (tmp_path/'scorer.log').read_text(errors='replace'), 60,
                 'the challenger loaded\n' + tail(tmp_path/'scorer.log'))
        _send(s, synthetic_transactions(N, seed=7, fraud_rate=0.01), tmp_path, N, labels=True)
        eng = db.make_engine(s.database_url)
        try: r = monitor.monitor_report(eng, s, 3600)
        finally: eng.dispose()
        _check_stable(s, r, v1, v2, capsys)
        from mlflow import MlflowClient
        MlflowClient(s.mlflow_tracking_uri, s.mlflow_tracking_uri).delete_registered_model_alias(s.model_name, 'challenger')
        registry.set_alias(s, 'champion', v2)
        wait_for(lambda: f'now serving model version {v2}' in (tmp_path/'scorer.log').read_text(errors='replace'), 60,
                 f'the scorer serving v{v2}\n' + tail(tmp_path/'scorer.log'))
        drifted = monitor.drift_transactions(synthetic_transactions(N, seed=8, fraud_rate=0.01))
        r = Replayer(s, drifted.drop(columns=['Class']), rate=0, label_delay_s=0).run(progress=False)
        assert r.delivered == N and r.failed == 0
        wait_for(lambda: scored_count(s) >= 2 * N, 120, f'{2 * N} rows scored\n' + tail(tmp_path/'scorer.log'))
        wait_for(lambda: query(s, "SELECT coalesce(sum(x), 0) FROM feature_rollup, unnest(counts) x WHERE feature = '__score__' AND model_version = %s",
                               (v2,))[0][0] == N, 30, 'the score counts of the drifted rows')
    finally:
        assert stop(scorer) == 0 and stop(sink) == 0
    eng = db.make_engine(s.database_url)
    try: r = monitor.monitor_report(eng, s, 3600)
    finally: eng.dispose()
    assert r['champion'] == v2 and r['n'] == N
    assert DRIFTED <= set(r['drifted']), r['features']
    untouched = {f'V{i}' for i in range(1, 29)} - set(monitor.DRIFTED_V)
    assert all(e['verdict'] == 'stable' for e in r['features'] if e['name'] in untouched), r['features']


def _check_stable(s, r, v1, v2, capsys):
    # drift: the stream comes from the training distribution
    assert r['champion'] == v1 and r['n'] == N and len(r['features']) == 33
    assert [e for e in r['features'] if e['verdict'] not in ('stable', 'seasonal')] == [], r['features']
    assert r['score_verdict'] == 'stable' and r['drifted'] == []
    # quality of v1 on its matured labels = scikit-learn on the stored rows
    rows = query(s, 'SELECT st.probability, st.is_fraud, l.label FROM scored_transactions st JOIN labels l USING (tx_id)')
    assert len(rows) == N and sum(r_[2] for r_ in rows) > 0
    q = {x['version']: x for x in r['versions']}
    assert set(q) == {v1}
    _close(q[v1], _sk(rows))
    # the shadow challenger v2 scored every transaction; side by side on the same labelled transactions
    shadow = query(s, 'SELECT sh.probability, sh.is_fraud, l.label FROM shadow_scores sh JOIN labels l USING (tx_id) WHERE sh.model_version = %s', (v2,))
    assert len(shadow) == N
    [cmp] = r['shadow']
    assert cmp['version'] == v2 and cmp['served'] == [v1] and cmp['n'] == N
    _close(cmp['champion'], _sk(rows)); _close(cmp['challenger'], _sk(shadow))
    # the command's JSON, on the same database (in process: tests/test_monitor.py runs the `fraud-nb monitor` subprocess)
    capsys.readouterr()
    assert monitor.monitor_main(['--json'], settings=s) == 0
    j = json.loads(capsys.readouterr().out)
    assert j['champion'] == v1 and {e['name'] for e in j['features']} == set(r_['name'] for r_ in r['features'])
    assert all(set(e) >= {'name', 'psi', 'verdict'} for e in j['features']) and isinstance(j['score_psi'], float)
    keys = ('version', 'precision', 'recall', 'average_precision', 'labels')
    assert [{k: x[k] for k in keys} for x in j['versions']] == [{k: x[k] for k in keys} for x in r['versions']]
    eng = db.make_engine(s.database_url)
    try: ev = monitor.shadow_evidence(eng, s, v2)
    finally: eng.dispose()
    assert ev['n'] == N and ev['ap_difference'] == pytest.approx(cmp['challenger']['average_precision'] - cmp['champion']['average_precision'], abs=1e-5)
