"""The newcomer trap of "the champion matches the data": `fraud-nb up --demo` without a dataset (the first champion is
trained on simulated raw events, the producer streams them), then a dataset file put in place and `up --demo` again:
`up` says loudly that the champion was trained on other data, trains a model on the file and promotes it, with the
reason recorded on the version; `status` is clean afterwards. A real embedded stack of its own, stopped at the end."""
import json, os, subprocess, sys

import pytest
from mlflow import MlflowClient

from conftest import fraud_nb_cmd
from fraud_nb.procs import free_port, wait_until
from fraud_nb.config import get_settings, read_stack_file
from fraud_nb.simulator import simulate, write_events


def cli(env, cwd, *args, timeout=900, ok=True) -> subprocess.CompletedProcess:
    r = subprocess.run(fraud_nb_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if ok: assert r.returncode == 0, f'{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


@pytest.fixture
def demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('FRAUD_NB_')}
    env.update(FRAUD_NB_STATE_DIR=str(tmp_path/'state'), FRAUD_NB_DATA_PATH=str(tmp_path/'data'/'events.csv'),
               FRAUD_NB_DASHBOARD_PORT=str(free_port()), FRAUD_NB_REPORTS_DIR=str(tmp_path/'reports'), PYTHONUNBUFFERED='1')
    (tmp_path/'data').mkdir()
    try: yield env, tmp_path
    finally: cli(env, tmp_path, 'down', timeout=300, ok=False)


def first_scored(url: str) -> tuple:
    "The first scored transaction's Kafka time, and the first scorer heartbeat that names partitions."
    from fraud_nb.db import make_engine, sa
    eng = make_engine(url)
    try:
        with eng.connect() as c:
            return tuple(c.execute(sa.text("""SELECT (SELECT min(kafka_ts) FROM scored_transactions),
                                                     (SELECT min(ts) FROM scorer_stats WHERE cardinality(partitions) > 0)""")).one())
    finally: eng.dispose()


def champion(env) -> tuple[str, dict]:
    s = get_settings(env)
    c = MlflowClient(s.mlflow_tracking_uri, registry_uri=s.mlflow_tracking_uri)
    mv = c.get_model_version_by_alias(s.model_name, 'champion')
    return str(mv.version), mv.tags


def test_demo_then_a_dataset_file_trains_and_promotes_a_model_on_the_file(demo):
    env, tmp = demo
    first = cli(env, tmp, 'up', '--demo')
    v1, tags1 = champion(env)
    assert v1 == '1' and tags1['data'].startswith('simulated:') and tags1['fraud_nb.feature_set'] == 'raw_events'
    assert 'SIMULATED raw events on an accelerated clock' in first.stdout and 'MISMATCH' not in first.stderr
    state = read_stack_file(tmp/'state')
    assert state['overrides']['retrain_min_labels'] == 14_000       # the demo's settings are kept for restarts
    # the producer waited for the scorer to own its partitions: no transaction waited for the group join
    plog = tmp/'state'/'logs'/'producer.log'
    wait_until(lambda: 'a scorer owns partitions' in plog.read_text(), 60, 'the producer to see the scorer own partitions')
    url = get_settings(env).database_url
    wait_until(lambda: first_scored(url)[0] is not None, 60, 'the first rows scored')
    first_tx, owned = first_scored(url)
    assert owned is not None and first_tx >= owned, (first_tx, owned)

    # the user puts a dataset in place (a small raw-event file) and starts the demo again
    path = tmp/'data'/'events.csv'
    write_events(simulate(days=24, customers=400, terminals=800, seed=7), path)
    plain = cli(env, tmp, 'status', ok=False)
    assert 'DATA MISMATCH' in plain.stderr and 'version 1' in plain.stderr and str(path) in plain.stderr

    second = cli(env, tmp, 'up', '--demo')
    assert 'DATA MISMATCH' in second.stderr and 'training a model on the data the system is fed' in second.stderr
    v2, tags2 = champion(env)
    assert v2 == '2' and tags2['data'] == str(path) and tags2['data_kind'] == 'raw_events'
    assert tags2['trigger'] == 'data-changed' and tags2['fraud_nb.promotion'].startswith('data-changed: the champion (version 1)')
    assert 'SIMULATED raw events' not in second.stdout       # the producer now replays the file: no simulated-clock claim
    # both champion moves are recorded changes (issue 14): the first training, then the promotion on the new data
    from fraud_nb import history
    from fraud_nb.db import make_engine
    s = get_settings(env)
    eng = make_engine(s.database_url)
    try: changes = [(h['from_version'], h['to_version'], h['actor']) for h in history.champion_history(eng, s.model_name)]
    finally: eng.dispose()
    assert changes[-2:] == [('1', '2', 'train'), (None, '1', 'train')], changes   # (a retrainer's promotion may follow)
    assert history.reconcile_now(s) is None                  # the alias and the history agree

    status = cli(env, tmp, 'status', ok=False)
    assert 'DATA MISMATCH' not in status.stderr, status.stderr
    log = tmp/'state'/'logs'/'producer.log'   # appended: the first producer's lines, then the restarted one's
    wait_until(lambda: "(event_time is the dataset's time)" in log.read_text(), 60, 'the producer replaying the file')
