"""Operating the embedded stack (issue 18): restarts reconnect, `status` tells the truth, `up` vouches only for its own.

One throwaway stack of its own (the session's stack is not killed): a raw-event champion, the scorer, the label
sink and the producer streaming simulated events; then the broker and PostgreSQL are killed in turn.
"""
import http.server, json, os, re, subprocess, sys, threading, time
from pathlib import Path

import psutil
import pytest

from fraud_nb.config import UserError, get_settings
from fraud_nb.stack import Stack
from fraud_nb.procs import find_process, port_owner, proc_record, spawn
from fraud_nb.health import dashboard_problem
from conftest import fraud_nb_cmd
from scorer_helpers import read_topic, train_raw_champion, wait_for


def _env(state: Path, home: Path) -> dict:
    "A stack of its own (state dir, HOME for the stack register); matplotlib's font cache shared, not rebuilt in every HOME (~20 s each)."
    import matplotlib
    return {**os.environ, 'HOME': str(home), 'MPLCONFIGDIR': matplotlib.get_cachedir(), 'FRAUD_NB_STATE_DIR': str(state), 'FRAUD_NB_STATS_INTERVAL_S': '1',
            'FRAUD_NB_PRODUCE_RATE': '100', 'FRAUD_NB_LABEL_DELAY_S': '2', 'FRAUD_NB_DATA_PATH': str(state.parent/'no-dataset.csv')}


def _cli(env, *args, cwd=None, timeout=180):
    return subprocess.run(fraud_nb_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _scored(stack) -> int:
    from fraud_nb.health import _query
    return _query(stack.service_settings(), 'SELECT count(*) FROM scored_transactions')[0][0]


def _healthy(env) -> bool:
    r = _cli(env, 'status', '--json', timeout=60)
    return r.returncode == 0


def _resumes(stack, env, what: str):
    "After `up`: rows keep arriving within seconds and `status` turns healthy."
    t0 = time.monotonic()
    wait_for(lambda: _scored_ok(stack), 60, f'scoring after the {what} restart')
    n = _scored(stack)
    wait_for(lambda: _scored_ok(stack) and _scored(stack) > n + 100, 60, f'rows arriving after the {what} restart')
    resumed_s = time.monotonic() - t0
    wait_for(lambda: _healthy(env), 90, f'status healthy after the {what} restart', interval=1)
    return resumed_s


def _scored_ok(stack):
    try: return _scored(stack) >= 0
    except Exception: return False


@pytest.fixture(scope='module')
def stream(tmp_path_factory):
    "A stack of its own with a champion, the scorer, the label sink and the producer streaming."
    root = tmp_path_factory.mktemp('ops')
    state, home = root/'state', root/'home'
    env = _env(state, home)
    old = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith('FRAUD_NB_') or k == 'HOME'})
    try:
        r = _cli(env, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
        s = get_settings()
        train_raw_champion(s)
        stack = Stack(s)
        stack.up(apps=['scorer', 'label-sink', 'producer'], say=print)
        yield stack, env, root
    finally:
        _cli(env, 'down')
        os.environ.clear(); os.environ.update(old)


def test_broker_restart_keeps_its_address_and_scoring_resumes(stream):
    stack, env, _ = stream
    wait_for(lambda: _scored(stack) > 200, 90, 'first rows scored')
    wait_for(lambda: _healthy(env), 60, 'status healthy under the stream', interval=1)
    before = stack.read_state()
    kafka = psutil.Process(before['services']['kafka']['pid']); kafka.kill(); kafka.wait(5)
    r = _cli(env, 'status')
    assert r.returncode == 1 and 'UNHEALTHY' in r.stdout, r.stdout
    r = _cli(env, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
    after = stack.read_state()
    assert after['kafka_bootstrap'] == before['kafka_bootstrap'] and after['services']['kafka']['pid'] != kafka.pid
    assert 'restarted EMPTY' in r.stdout and 'scorer: restarted against the new broker' in r.stdout, r.stdout
    assert 'lost with the old broker' in r.stdout and 'transactions not yet scored' in r.stdout, r.stdout   # says what went
    resumed_s = _resumes(stack, env, 'broker')
    print(f'broker restart: scoring resumed after {resumed_s:.1f} s')


def test_postgres_restart_and_scoring_resumes(stream):
    stack, env, _ = stream
    wait_for(lambda: _healthy(env), 90, 'status healthy under the stream', interval=1)
    pg = psutil.Process(stack.read_state()['services']['postgres']['pid']); pg.kill(); pg.wait(5)
    r = _cli(env, 'status')
    assert r.returncode == 1 and 'dead' in r.stdout, r.stdout
    r = _cli(env, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
    assert 'postgres: recorded process' in r.stdout, r.stdout
    resumed_s = _resumes(stack, env, 'postgres')
    print(f'postgres restart: scoring resumed after {resumed_s:.1f} s')


def test_a_stuck_scorer_is_unhealthy(stream):
    "SIGSTOP the scorer: the process lives, but its heartbeat stops and status says so."
    stack, env, _ = stream
    wait_for(lambda: _healthy(env), 90, 'status healthy', interval=1)
    scorer = psutil.Process(stack.read_state()['services']['scorer']['pid'])
    scorer.suspend()
    try:
        wait_for(lambda: not _healthy(env), 30, 'status noticing the stopped scorer', interval=1)
        r = _cli(env, 'status')
        assert 'scorer' in r.stdout and 'no heartbeat' in r.stdout, r.stdout
    finally: scorer.resume()
    wait_for(lambda: _healthy(env), 60, 'status healthy again', interval=1)


def test_a_killed_producer_is_restarted_and_its_lost_labels_are_counted(stream):
    "kill -9 of the producer: the labels it held die with it; `up` restarts it and says how many transactions will never get one."
    stack, env, _ = stream
    wait_for(lambda: _scored(stack) > 0, 60, 'rows scored')
    producer = psutil.Process(stack.read_state()['services']['producer']['pid']); producer.kill(); producer.wait(5)
    r = _cli(env, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r'producer: died holding the labels not yet due: up to ([\d,]+) of the transactions it sent will never get a label', r.stdout)
    assert m and int(m[1].replace(',', '')) > 0, r.stdout     # simulated labels follow by 7 days of event time: most still held
    assert find_process(stack.read_state()['services']['producer']), 'the producer was not restarted'


def test_up_from_another_directory_points_at_the_running_stack(stream, tmp_path):
    stack, env, root = stream
    other = {k: v for k, v in env.items() if k != 'FRAUD_NB_STATE_DIR'}
    r = _cli(other, 'up', '--core', cwd=tmp_path)
    assert r.returncode == 2 and str(stack.dir) in r.stderr and 'already runs' in r.stderr, r.stdout + r.stderr
    assert not (tmp_path/'.fraud_nb'/'stack.json').exists()


def test_dashboard_port_taken_by_another_server(stream, tmp_path):
    "Another server on the dashboard port: `up` refuses, and a health check never vouches for it."
    stack, env, _ = stream
    srv = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        from dataclasses import replace
        s = replace(stack.service_settings(), dashboard_port=port)
        with pytest.raises(UserError, match=f'port 127.0.0.1:{port} is taken by pid {os.getpid()}'):
            Stack(s).up(apps=['dashboard'], say=print)
        assert port_owner(port).pid == os.getpid()
        bystander = subprocess.Popen(['sleep', '30'])
        try: assert 'not by our dashboard' in dashboard_problem(s, psutil.Process(bystander.pid))
        finally: bystander.kill(); bystander.wait()
    finally: srv.shutdown()


@pytest.mark.parametrize('url,needle', [('not a url', 'not a PostgreSQL URL'),
                                        ('postgresql+psycopg2://u:p@127.0.0.1:1/x', 'the database does not answer')])
def test_up_refuses_a_bad_database_url_in_one_line(tmp_path, url, needle):
    env = {**_env(tmp_path/'state', tmp_path/'home'), 'FRAUD_NB_DATABASE_URL': url}
    r = _cli(env, 'up', '--core', timeout=60)
    assert r.returncode == 2 and needle in r.stderr and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path/'state'/'pg').exists()


def test_up_uses_an_external_database(stream, tmp_path):
    "FRAUD_NB_DATABASE_URL set and reachable: `up` uses it and starts no PostgreSQL of its own."
    stack, _, _ = stream
    env = {**_env(tmp_path/'state', tmp_path/'home'), 'FRAUD_NB_DATABASE_URL': stack.service_settings().database_url}
    try:
        r = _cli(env, 'up', '--core'); assert r.returncode == 0, r.stdout + r.stderr
        assert 'postgres: using FRAUD_NB_DATABASE_URL' in r.stdout and not (tmp_path/'state'/'pg').exists(), r.stdout
        r = _cli(env, 'status'); assert r.returncode == 0 and 'external' in r.stdout, r.stdout + r.stderr
    finally: _cli(env, 'down')
    assert find_process(stack.read_state()['services']['postgres'])   # the database it borrowed still runs


def _send_labels(s, *labels: tuple[str, bytes]):
    from confluent_kafka import Producer
    p = Producer({'bootstrap.servers': s.kafka_bootstrap})
    for key, value in labels: p.produce(s.topic_labels, value, key=key)
    assert p.flush(10) == 0


def test_up_gives_the_label_sink_secrets_of_its_own(stream):
    "Issue 17 item 4: `up` generated one label secret per trusted source (0600, never printed or logged); its label sink stores a label signed with the producer's secret and refuses a forged one."
    from fraud_nb.contracts import parse_label_secrets, read_dead_letter, sign_label
    from fraud_nb.health import _query
    from fraud_nb.stack import label_secrets_of
    stack, env, _ = stream
    f = stack.dir/'label-secrets'
    assert f.stat().st_mode & 0o777 == 0o600
    secrets = parse_label_secrets(f.read_text())
    assert set(secrets) == {'producer', 'analyst'} and all(len(v) >= 32 for v in secrets.values())
    s = stack.service_settings()
    assert label_secrets_of(s) == f.read_text().strip()   # what a hand-started `fraud-nb produce` signs with
    _send_labels(s, ('ops-signed', sign_label('ops-signed', 1, source='producer', secret=secrets['producer'])),
                 ('ops-forged', sign_label('ops-forged', 1, source='producer', secret=b'a-guessed-secret-of-32-bytes....')))
    wait_for(lambda: _query(s, "SELECT source FROM labels WHERE tx_id = 'ops-signed'") == [('producer',)], 60, 'the signed label stored')
    dead = wait_for(lambda: [d for d in map(read_dead_letter, read_topic(s, s.topic_labels_dlq, 10**6, timeout=2)) if d['key'] == b'ops-forged'],
                    60, 'the forged label in the labels DLQ')
    assert 'forged label' in dead[0]['reason'] and not _query(s, "SELECT 1 FROM labels WHERE tx_id = 'ops-forged'")
    said = [_cli(env, 'status').stdout, _cli(env, 'config').stdout, stack.state_path.read_text(),
            *(p.read_text(errors='replace') for p in (stack.dir/'logs').glob('*.log'))]
    for secret in secrets.values(): assert not any(secret.decode() in text for text in said), 'a label secret was printed or logged'


# A stand-in for the retrainer (the real one's SIGTERM handling is tested in tests/test_retrain_stop.py): told to stop,
# it takes 2 s and then needs PostgreSQL, as a run recording itself as interrupted does.
FAKE_RETRAINER = """
import signal, sys, time, sqlalchemy as sa
def stop(*_):
    time.sleep(2)
    with sa.create_engine(sys.argv[1]).connect() as c: c.execute(sa.text('SELECT 1'))
    open(sys.argv[2], 'w').write('recorded'); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True: time.sleep(0.1)
"""


def test_down_drains_says_what_is_lost_and_the_next_up_says_it_again(stream, tmp_path):
    "Last: `down` stops the producer first, the retrainer next while PostgreSQL runs, counts what nobody consumed; `up` repeats it."
    from fraud_nb.contracts import sign_label
    from fraud_nb.contracts import parse_label_secrets
    stack, env, _ = stream
    s, state = stack.service_settings(), stack.read_state()
    sink = psutil.Process(state['services']['label-sink']['pid']); sink.kill(); sink.wait(5)   # labels nobody will store
    secret = parse_label_secrets((stack.dir/'label-secrets').read_text())['producer']
    _send_labels(s, *((f'ops-late-{i}', sign_label(f'ops-late-{i}', 0, source='producer', secret=secret)) for i in range(25)))
    marker = tmp_path/'retrainer-stopped'
    fake = spawn([sys.executable, '-c', FAKE_RETRAINER, s.database_url, str(marker)], stack.log_path('retrainer'))
    with stack._locked():
        st = stack.read_state(); st['services']['retrainer'] = proc_record(fake); stack._write_state(st)
    r = _cli(env, 'down')
    assert r.returncode == 0, r.stderr
    assert 'in memory only' in r.stdout and 'producer: stopped first' in r.stdout, r.stdout
    assert 'producer: was not running' not in r.stdout and 'label-sink: was not running' in r.stdout, r.stdout   # stopped by the drain, not crashed
    assert not re.search(r': -\d', r.stdout), r.stdout   # no negative counts
    assert 'scorer: caught up' in r.stdout or 'transactions left unconsumed' in r.stdout, r.stdout
    left = re.search(r'label-sink: ([\d,]+) labels left unconsumed', r.stdout)
    assert left and int(left[1].replace(',', '')) >= 25, r.stdout
    assert marker.read_text() == 'recorded' and find_process(proc_record(fake)) is None   # stopped with its database up
    assert json.loads((stack.dir/'lost.json').read_text())['labels'] == int(left[1].replace(',', ''))
    r = _cli(env, 'up', '--core')
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'dropped' in r.stdout and f'{left[1]} labels not yet stored' in r.stdout, r.stdout
    assert not (stack.dir/'lost.json').exists()
