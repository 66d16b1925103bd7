"The foundation: configuration errors, and the embedded stack driven through the real `fraud-nb` command."
import json, os, subprocess, sys, uuid

import psutil
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer

from fraud_nb.config import ConfigError, get_settings, env_vars
from fraud_nb.procs import find_process
from conftest import fraud_nb_cmd


@pytest.mark.parametrize('var,value,needle', [
    ('FRAUD_NB_BATCH_MAX', 'lots', 'not a valid int'),
    ('FRAUD_NB_BATCH_WAIT_MS', '-3', 'must be > 0'),
    ('FRAUD_NB_REVIEW_COST', 'inf?', 'not a valid float'),
    ('FRAUD_NB_DASHBOARD_PORT', '0', 'TCP port'),
    ('FRAUD_NB_TOPIC_LABELS', 'no spaces', 'Kafka topic'),
    ('FRAUD_NB_LOG_LEVEL', 'chatty', 'DEBUG, INFO'),
    ('FRAUD_NB_RETRAIN_MIN_LABEL', '10', 'unknown setting'),
])
def test_config_errors_name_the_variable(var, value, needle):
    with pytest.raises(ConfigError) as e: get_settings({var: value})
    assert var in str(e.value) and needle in str(e.value)


def test_config_reads_every_variable():
    env = {'FRAUD_NB_RETRAIN_MIN_LABELS': '42', 'FRAUD_NB_REVIEW_COST': '7.5', 'FRAUD_NB_KAFKA_BOOTSTRAP': 'k:1'}
    s = get_settings(env)
    assert (s.retrain_min_labels, s.review_cost, s.kafka_bootstrap) == (42, 7.5, 'k:1')
    assert len(env_vars()) == len(set(env_vars())) > 20


def test_bad_config_stops_a_command_at_startup(tmp_path):
    r = subprocess.run(fraud_nb_cmd('status'), env={**os.environ, 'FRAUD_NB_BATCH_MAX': 'x', 'FRAUD_NB_STATE_DIR': str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'FRAUD_NB_BATCH_MAX' in r.stderr


def _cli(state_dir, *args, timeout=180):
    env = {**os.environ, 'FRAUD_NB_STATE_DIR': str(state_dir)}
    return subprocess.run(fraud_nb_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_up_status_roundtrip_down(tmp_path):
    "fraud-nb up --core; status shows all healthy; Kafka and PostgreSQL work; a second up reuses; a killed broker is reported; down leaves nothing."
    state_dir = tmp_path/'state'
    try:
        r = _cli(state_dir, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
        r = _cli(state_dir, 'status', '--json'); assert r.returncode == 0, r.stdout + r.stderr
        services = {row['service']: row for row in json.loads(r.stdout)['services']}
        assert {n: (services[n]['state'], services[n]['healthy']) for n in ('postgres', 'kafka', 'mlflow')} == \
               {n: ('running', True) for n in ('postgres', 'kafka', 'mlflow')}
        s = get_settings({'FRAUD_NB_STATE_DIR': str(state_dir)})
        # a message goes through the broker
        p = Producer({'bootstrap.servers': s.kafka_bootstrap}); p.produce(s.topic_transactions, key='k', value=b'v1'); assert p.flush(10) == 0
        c = Consumer({'bootstrap.servers': s.kafka_bootstrap, 'group.id': f'g-{uuid.uuid4()}', 'auto.offset.reset': 'earliest', 'session.timeout.ms': 6000})
        c.subscribe([s.topic_transactions]); got = None
        try:
            for _ in range(150):
                m = c.poll(0.2)
                if m is not None and not m.error(): got = m.value(); break
        finally: c.close()
        assert got == b'v1'
        # a row goes through PostgreSQL
        eng = sa.create_engine(s.database_url)
        with eng.begin() as conn: conn.execute(sa.text("INSERT INTO labels (tx_id, label, labeled_at) VALUES (:t, 1, now())"), {'t': 'tx-a'})
        with eng.connect() as conn: assert conn.execute(sa.text('SELECT label FROM labels WHERE tx_id = :t'), {'t': 'tx-a'}).scalar() == 1
        eng.dispose()
        # a second up reuses the running processes
        before = json.loads((state_dir/'stack.json').read_text())['services']
        r = _cli(state_dir, 'up', '--core'); assert r.returncode == 0, r.stderr
        after = json.loads((state_dir/'stack.json').read_text())['services']
        assert before['kafka']['pid'] == after['kafka']['pid'] and before['postgres']['pid'] == after['postgres']['pid']
        # a crash is reported, not hidden
        psutil.Process(after['kafka']['pid']).kill(); psutil.Process(after['kafka']['pid']).wait(5)
        r = _cli(state_dir, 'status')
        assert r.returncode == 1 and 'dead' in r.stdout
        records = [rec for rec in after.values() if rec.get('pid')]
    finally:
        r = _cli(state_dir, 'down')
    assert r.returncode == 0, r.stderr
    for rec in records: assert find_process(rec) is None
    assert not (state_dir/'stack.json').exists()
    assert not any(str(state_dir) in ' '.join(p.info['cmdline'] or []) for p in psutil.process_iter(['cmdline']))


def test_down_leaves_other_processes_alone(tmp_path):
    "A process that is not ours, even one whose pid sits in the state file, survives `down`."
    bystander = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        state_dir = tmp_path/'state'; state_dir.mkdir()
        fake = {'services': {'kafka': {'pid': bystander.pid, 'create_time': psutil.Process(bystander.pid).create_time() - 100}}}
        (state_dir/'stack.json').write_text(json.dumps(fake))
        r = _cli(state_dir, 'down'); assert r.returncode == 0, r.stderr
        assert bystander.poll() is None
    finally: bystander.kill(); bystander.wait()


def test_status_exits_non_zero_when_nothing_runs(tmp_path):
    r = _cli(tmp_path/'state', 'status')
    assert r.returncode == 1 and 'nothing runs' in r.stdout, (r.returncode, r.stdout, r.stderr)


def test_plain_up_keeps_the_settings_the_stack_was_started_with(tmp_path, monkeypatch):
    "`up --demo` records its overrides in stack.json; a plain `up` (e.g. restarting a killed producer) uses them again."
    from fraud_nb import cli
    state = tmp_path/'state'; state.mkdir()
    (state/'stack.json').write_text(json.dumps({'services': {}, 'overrides': {'retrain_min_labels': 14_000, 'produce_rate': 100.0, 'label_delay_s': 10.0}}))
    for k in list(os.environ):
        if k.startswith('FRAUD_NB_'): monkeypatch.delenv(k)
    monkeypatch.setenv('FRAUD_NB_STATE_DIR', str(state))
    s = cli._settings_of_stack(demo=False)
    assert (s.retrain_min_labels, s.produce_rate, s.label_delay_s) == (14_000, 100.0, 10.0)
    monkeypatch.setenv('FRAUD_NB_PRODUCE_RATE', '7')   # an explicit variable still wins
    assert cli._settings_of_stack(demo=False).produce_rate == 7.0
