"""The MLflow registry on the stack's real PostgreSQL-backed store: register, alias, load, compare, the CLI as a process.

The commands `fraud-nb train`, `evaluate` and `promote` live in fraud_nb.training (nbs/06b_train, where their options, errors and
exit codes are tested); here they run against this store."""
import json, subprocess

import numpy as np
import pytest

from fraud_nb import registry, training
from fraud_nb.data import synthetic_transactions, time_split
from fraud_nb.model import FEATURES, train_model
from fraud_nb.evaluation import evaluate, plot_pr_curve

from conftest import service_env, fraud_nb_cmd
from scorer_helpers import query


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
    tags = registry._client(settings).get_model_version(settings.model_name, '1').tags
    assert tags['data'] == str(sample) and tags['threshold_rule'] == 'alert budget 100/day'      # like raw events (issue 13)
    from fraud_nb.history import os_user
    (changed,), = query(settings, 'SELECT row(from_version, to_version, actor, who, reason)::text FROM champion_history WHERE model_name = %s',
                        (settings.model_name,))
    assert changed == f'(,1,train,{os_user()},"the first champion (fraud-nb train, trigger cli)")'   # the first champion is a recorded change
    r = subprocess.run(fraud_nb_cmd('evaluate', '--data', str(sample), '--json'), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['metrics']['n'] == 4000


def test_evaluate_reports_the_rows_a_version_learnt_from_the_stream(settings, tmp_path, capsys):
    """Issue 18 item 7: a version that learnt from the stream (tag fraud_nb.train_end) is graded on the test rows it never
    saw; the 500 streamed, labelled rows up to train_end (matched by content in PostgreSQL) are reported separately."""
    from datetime import datetime, timedelta, timezone
    from fraud_nb.data import time_split
    import psycopg2
    from fraud_nb.pg import pg_params
    sample = tmp_path/'sample.csv'
    df = synthetic_transactions(20_000, seed=2, fraud_rate=0.02)
    df.to_csv(sample, index=False)
    assert training.train_main(['--data', str(sample), '--n-estimators', '30', '--json'], settings=settings) == 0
    capsys.readouterr()
    streamed = time_split(df)[2].head(500)                       # the producer streamed these test rows, and they were labelled
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    conn = psycopg2.connect(**pg_params(settings.database_url))
    with conn, conn.cursor() as cur:
        for k, (_, r) in enumerate(streamed.iterrows()):
            cur.execute("""INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold,
                           model_version, scored_at, kafka_partition, kafka_offset, scorer_id) VALUES (%s, %s, %s, %s, %s, 0.1, false, 0.5, '1', now(), 0, %s, 't')""",
                        (f'tx-{k}', t0 + timedelta(seconds=k), float(r.Time), float(r.Amount), [float(r[f'V{i}']) for i in range(1, 29)], k))
            cur.execute('INSERT INTO labels (tx_id, label, labeled_at) VALUES (%s, %s, now())', (f'tx-{k}', int(r.Class)))
    conn.close()
    client = registry._client(settings)

    def evaluate(train_end):
        client.set_model_version_tag(settings.model_name, '1', 'fraud_nb.train_end', train_end.isoformat())
        assert training.evaluate_main(['--data', str(sample), '--json'], settings=settings) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    e, err = evaluate(t0 + timedelta(seconds=10_000))           # after every streamed row: all 500 were learnt from
    assert e['seen_rows'] == 500 and e['metrics']['n'] == 3_500 and e['metrics_seen']['n'] == 500, e
    assert 'already saw 500 of the 4,000 test rows' in err and '500 streamed rows it learnt from' in e['seen_by_model']
    e, _ = evaluate(t0 + timedelta(seconds=199))                # only the first 200 streamed rows are older than train_end
    assert e['seen_rows'] == 200 and e['metrics']['n'] == 3_800
    e, _ = evaluate(t0 - timedelta(seconds=1))                  # trained on no streamed test row: nothing separated
    assert e['seen_rows'] == 0 and e['metrics']['n'] == 4_000 and e['metrics_seen'] is None
