"""Raw events end to end through the CLI: `fraud-nb simulate`, `train --data`, `evaluate --json` against the session's
real MLflow store; the registered version names its feature set and data; behavioural features beat the raw fields.
(benchmarks/raw_events_quality.py has the full comparison over seeds.)"""
import json, subprocess

import numpy as np
import pytest
import xgboost as xgb
from mlflow import MlflowClient
from sklearn.metrics import average_precision_score

from conftest import fraud_nb_cmd, service_env
from fraud_nb.data import DatasetSource
from fraud_nb.features import RAW_EVENTS
from fraud_nb.model import DEFAULT_PARAMS
from fraud_nb.training import raw_features

RAW_ONLY = ['amount', 'hour', 'weekend', 'night']


def run(settings, *args, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(fraud_nb_cmd(*args), env=service_env(settings), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f'{args}: exit {r.returncode}\n{r.stderr[-3000:]}'
    return r


@pytest.fixture(scope='module')
def events(tmp_path_factory):
    path = tmp_path_factory.mktemp('raw')/'events.csv.gz'
    r = subprocess.run(fraud_nb_cmd('simulate', '--out', str(path), '--days', '28', '--customers', '1500',
                                    '--terminals', '3000', '--seed', '5'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return path


def test_train_and_evaluate_raw_events_through_the_cli(settings, events):
    r = run(settings, 'train', '--data', str(events), '--seeds', '2', '--n-estimators', '200', '--json')
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['aliases'] == ['champion'] and out['data'] == str(events)
    assert out['seeds']['n'] == 2 and set(out['seeds']['metrics']) == {'average_precision', 'roc_auc', 'card_precision_at_100'}
    assert 'raw events from' in r.stderr and 'last 7 days (after 7 delay days)' in r.stderr
    tags = MlflowClient(settings.mlflow_tracking_uri).get_model_version(settings.model_name, out['version']).tags
    assert (tags['fraud_nb.feature_set'], tags['fraud_nb.feature_set_version']) == ('raw_events', '1')
    assert (tags['data'], tags['data_kind'], tags['synthetic']) == (str(events), 'raw_events', 'false')
    assert DatasetSource.from_tag(tags['data']) == DatasetSource.file(events)
    assert json.loads(tags['seed_spread'])['chosen_seed'] in (0, 1)

    e = json.loads(run(settings, 'evaluate', '--data', str(events), '--json').stdout.strip().splitlines()[-1])
    for k in ('average_precision', 'roc_auc', 'card_precision_at_100'):
        assert 0 < e[k] <= 1, (k, e[k])
        assert e[k] == pytest.approx(out['test'][k])   # the same test days, the same model
    assert e['version'] == out['version'] and e['metrics']['frauds'] > 10
    print('raw events, CLI:', {k: round(e[k], 3) for k in ('average_precision', 'roc_auc', 'card_precision_at_100')})


def test_behavioural_features_beat_the_raw_fields(events):
    "A quick version of benchmarks/raw_events_quality.py: one seed, the same XGBoost, the same day split."
    parts, F = raw_features(DatasetSource.file(events))
    names = list(RAW_EVENTS.features)
    y = parts['all'].Class.to_numpy()
    tr, va, te = parts['train'].index, parts['valid'].index, parts['test'].index
    ap = {}
    for name, cols in {'behavioural': names, 'raw fields': RAW_ONLY}.items():
        X = F[:, [names.index(c) for c in cols]]
        p = {**DEFAULT_PARAMS, 'seed': 0, 'nthread': 1}
        b = xgb.train(p, xgb.DMatrix(X[tr], y[tr]), 300, evals=[(xgb.DMatrix(X[va], y[va]), 'valid')],
                      early_stopping_rounds=40, verbose_eval=False)
        hist = tr.append(va)   # then refit on the whole training window, as `fraud-nb train` does
        b = xgb.train(p, xgb.DMatrix(X[hist], y[hist]), int(round((b.best_iteration + 1) * 1.25)))
        ap[name] = average_precision_score(y[te], b.inplace_predict(X[te]))
    print('average precision on the test days:', {k: round(v, 3) for k, v in ap.items()})
    assert ap['behavioural'] > ap['raw fields'] + 0.15, ap
