"""The MLflow registry on the stack's real PostgreSQL-backed store: register, alias, load, compare, the CLI as a process.

The command functions (train_main, evaluate_main: options, errors, exit codes) are tested in nbs/06_registry."""
import json, subprocess

import numpy as np
import pytest

from fraud_nb import registry
from fraud_nb.data import synthetic_transactions, time_split
from fraud_nb.model import FEATURES, train_model
from fraud_nb.evaluation import evaluate, plot_pr_curve

from conftest import service_env, fraud_nb_cmd


@pytest.fixture(scope='module')
def data():
    return time_split(synthetic_transactions(40_000, seed=8, fraud_rate=0.01))


@pytest.fixture(scope='module')
def models(data):
    train, valid, _ = data
    return (train_model(train, valid, n_estimators=60, params=dict(learning_rate=0.2)),
            train_model(train, valid, n_estimators=60, params=dict(learning_rate=0.2, max_depth=3), seed=1))


def test_round_trip(settings, data, models):
    _, _, test = data
    model = models[0]
    metrics = evaluate(model, test)
    assert registry.champion_version(settings) is None and registry.load_champion(settings) is None
    v = registry.register_model(model, settings, metrics=metrics, alias='champion', tags={'data': 'synthetic'},
                                figures={'pr': plot_pr_curve({'t': (test.Class, model.predict_proba(test))})})
    assert v == '1' and registry.champion_version(settings) == v
    loaded = registry.load_champion(settings)
    assert loaded.version == v and loaded.threshold == model.threshold and loaded.features == FEATURES
    np.testing.assert_array_equal(loaded.predict_proba(test), model.predict_proba(test))
    assert loaded.metrics['average_precision'] == pytest.approx(metrics['average_precision'])
    loaded.check_compatible()
    client = registry._client(settings)
    mv = client.get_model_version(settings.model_name, v)
    assert json.loads(mv.tags['features']) == FEATURES and mv.tags['data'] == 'synthetic'
    assert [a.path for a in client.list_artifacts(mv.tags['run_id'], 'plots')] == ['plots/pr.png']
    run = client.get_run(mv.tags['run_id'])
    assert run.data.metrics['average_precision'] == pytest.approx(metrics['average_precision'])
    assert 'max_depth' in run.data.params


def test_aliases_and_compare(settings, data, models):
    _, _, test = data
    v1 = registry.register_model(models[0], settings, metrics=evaluate(models[0], test), alias='champion')
    v2 = registry.register_model(models[1], settings, metrics=evaluate(models[1], test), alias='challenger')
    assert (registry.champion_version(settings), registry.alias_version(settings, 'challenger')) == (v1, v2)
    cmp = registry.compare_versions(settings, v1, v2, test)
    assert list(cmp.columns) == [f'version {v1}', f'version {v2}', 'difference']
    assert cmp.loc['average_precision', f'version {v2}'] == pytest.approx(evaluate(models[1], test)['average_precision'])
    registry.set_alias(settings, 'champion', v2)
    assert registry.load_champion(settings).version == v2
    np.testing.assert_array_equal(registry.load_version(settings, v1).predict_proba(test), models[0].predict_proba(test))


def test_feature_mismatch_refused_after_loading(settings, models):
    v = registry.register_model(models[0], settings, metrics={})
    registry._client(settings).set_model_version_tag(settings.model_name, v, 'features', json.dumps(FEATURES[:-1] + ['hour_v2']))
    with pytest.raises(ValueError, match='hour_v2'): registry.load_version(settings, v).check_compatible()


def test_cli_as_a_process(settings, tmp_path):
    "The console entry point with settings from the environment, as docker-compose and the stack run it."
    sample = tmp_path/'sample.csv'
    synthetic_transactions(20_000, seed=2, fraud_rate=0.01).to_csv(sample, index=False)
    env = service_env(settings)
    r = subprocess.run(fraud_nb_cmd('train', '--data', str(sample), '--n-estimators', '30'), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '(champion)' in r.stdout and 'SYNTHETIC' not in r.stdout
    assert registry._client(settings).get_model_version(settings.model_name, '1').tags['data'] == str(sample)
    r = subprocess.run(fraud_nb_cmd('evaluate', '--data', str(sample), '--json'), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['metrics']['n'] == 4000
