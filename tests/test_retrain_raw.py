"""Retraining on raw events (issues 12 and 13) against the real stack: a raw-event champion trained through `fraud-nb train`'s
code path on a small simulated world, the same world's next 20 days streamed through the real scorer and label sink (the
demo's stream continues the first champion's history; the scored rows, their stored features and label_seq are the
scorer's own), then a real papermill run of nbs/retrain.ipynb. (A stream on a clock that overlaps the history, where the
history becomes prior data, is the example of `retrain_raw.raw_frames` in its chapter.)"""
import json
from itertools import islice
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import sqlalchemy as sa

from fraud_nb import db, registry, retrain, training
from fraud_nb.data import DatasetSource
from fraud_nb.features import RAW_EVENTS
from fraud_nb.simulator import stream_days
from fraud_nb.stream import RawReplayer, raw_passes
from scorer_helpers import wait_for, query, scored_count, start_scorer, start_labels, stop, tail, wait_consuming

HISTORY = DatasetSource.generated(28, 0, 'simulated', customers=500, terminals=800)   # 28 days: 7 test + 7 delay + 14 training (7 validate)


def raw_champion(settings) -> str:
    "`fraud-nb train`'s raw-event fit (training._fit_raw: RAW_EVENTS.batch over the history, fit_model, alert-budget threshold), registered as champion."
    a = SimpleNamespace(n_estimators=80, no_refit=False, seeds=1, seed=0, review_cost=None)
    model, metrics, _, tags, _ = training._fit_raw(a, settings, HISTORY)
    return registry.register_model(model, settings, metrics=metrics, tags=tags, alias='champion')


def test_raw_event_retraining_run(settings, tmp_path):
    v1 = raw_champion(settings)
    world = pd.concat(islice(stream_days(500, 800, seed=0, from_day=28), 20), ignore_index=True)   # the demo's case: the history's future
    logs = {n: tmp_path/f'{n}.log' for n in ('scorer', 'labels')}
    scorer, labels = start_scorer(settings, logs['scorer']), start_labels(settings, logs['labels'])
    try:
        wait_consuming(logs['scorer'])
        s = RawReplayer(settings, raw_passes(world), rate=8_000, prefix='w', label_delay_days=7).run()
        assert s.delivered == len(world) and s.failed == 0, s.line()
        wait_for(lambda: scored_count(settings) >= len(world), 180, f'{len(world):,} rows scored\n' + tail(logs['scorer']))
        wait_for(lambda: query(settings, 'SELECT count(*) FROM labels')[0][0] >= len(world), 90, 'every label stored\n' + tail(logs['labels']))
    finally:
        assert stop(scorer) == 0, tail(logs['scorer'])
        stop(labels)
    (n_raw, n_seq), = query(settings, 'SELECT count(card_id), count(DISTINCT label_seq) FROM scored_transactions')
    assert n_raw == len(world) and n_seq > 1, 'raw rows scored with the labels that had arrived'  # labels land in bursts on a busy machine

    o = retrain.run_retraining(settings, trigger='labels', parameters=dict(n_estimators=150))
    assert o.status == 'succeeded', o.error
    r = o.result
    assert r['kind'] == 'raw_events' and r['feature_set'] == 'raw_events'
    assert not r['stream_notes']['history_as_prior'] and r['stream_notes']['stream_labelled'] == len(world)   # one timeline
    assert r['stream_notes']['served_max_rel_diff'] <= 1e-9, r['stream_notes']   # trained and judged on the features the scorer served
    ev = r['evidence']
    assert ev['holdout_frauds'] >= 30 and ev['look'] == 1 and len(ev['cost_diff_interval']) == 2 and ev['split']['holdout'] == r['holdout']
    assert ev['split']['stream_train'] > 0 and ev['split']['stream_in_gap'] > 0       # the challenger learnt from the stream, 7 days before the holdout
    assert o.decision in ('promoted', 'kept') and o.decision == ('promoted' if ev['promote'] else 'kept')
    assert o.reason.startswith(('Promoted', 'The champion stays', 'Not enough evidence')) and o.reason.endswith('.')
    assert registry.champion_version(settings) == (r['challenger_version'] if ev['promote'] else v1)
    # the run's row, the report and the version
    eng = db.make_engine(settings.database_url)
    with eng.connect() as c: row = dict(c.execute(sa.text('SELECT * FROM retrain_runs')).one()._mapping)
    eng.dispose()
    stored_ev = row['evidence'] if isinstance(row['evidence'], dict) else json.loads(row['evidence'])
    assert row['status'] == 'succeeded' and row['decision'] == o.decision and stored_ev['verdict'] == o.reason
    html = Path(row['report_html']).read_text()
    first = html[:html.index('The data used')]
    assert 'raw events' in first and 'raw_events' in first and o.reason[:60] in first, 'the first screen says what was decided, on which data'
    assert 'Card precision@100 per day' in html and 'prior data' not in first
    tags = registry.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri).get_model_version(
        settings.model_name, r['challenger_version']).tags
    assert tags['fraud_nb.feature_set'] == 'raw_events' and tags['fraud_nb.feature_set_version'] == RAW_EVENTS.version
    assert tags['data'] == HISTORY.tag and tags['fraud_nb.train_end'] == r['train_end'] and r['train_end'] > '2026-01-29'
    assert json.loads(tags['fraud_nb.evidence.holdout_frauds']) == ev['holdout_frauds'] and tags['fraud_nb.evidence.verdict'] == o.reason
    m = registry.load_version(settings, r['challenger_version']); m.check_compatible()   # a scorer can serve it
    assert 0 < r['challenger_metrics']['card_precision_at_100'] <= 1 and 0 < r['challenger_metrics']['average_precision'] <= 1
