"""Changing what is served requires authority (issue 17, item 3): the MLflow server of docker-compose.yml.

Static checks read docker-compose.yml, docker/Dockerfile and docker/mlflow/basic_auth.ini: the server
runs MLflow's basic-auth app through the entrypoint docker/mlflow/auth_server.py, every credential
reaches a container only from .env (`${...}`), `train` and the retrainer get the writer account,
the scorers, the dashboard and JupyterLab the reader account.

The real test starts the server here as compose does: the same entrypoint script and auth ini (the
files the image installs, found through docker/Dockerfile's COPY lines), the same command line and
environment, with only the host, port and storage swapped (127.0.0.1, a free port, SQLite and a
temporary artifact directory instead of PostgreSQL and the volume), and the passwords of a
throwaway .env. A model registered by the writer then gets probed: an anonymous or read-only alias
move or delete is refused and changes nothing; the writer's goes through; the scorers' account reads
what they need through the MLflow client, with the credentials compose gives them.
"""
from __future__ import annotations

import base64, configparser, json, os, re, secrets, signal, socket, sqlite3, subprocess, sys, time
import urllib.error, urllib.request, uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT/'docker-compose.yml'
DOCKERFILE = ROOT/'docker'/'Dockerfile'
HEALTHCHECK = ROOT/'docker'/'healthcheck.sh'
BIN = Path(sys.executable).parent
WRITERS, READERS = {'train', 'retrainer'}, {'scorer', 'dashboard', 'jupyterlab'}
REF = re.compile(r'\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}')
SECRET = re.compile(r'PASSWORD|SECRET|TOKEN|_URI$', re.I)
START_TIMEOUT_S = 240  # 20-35 s on two idle cores; other test sessions may share them


# ------------------------------------------------------------------------------------------ helpers
def services() -> dict: return yaml.safe_load(COMPOSE.read_text())['services']

def env_of(svc: dict) -> dict: return dict(svc.get('environment') or {})

def interpolate(value: str, dotenv: dict) -> str:
    "Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (innermost first), with `dotenv` as .env."
    def one(expr: str) -> str:
        name, op, arg = re.fullmatch(r'([A-Za-z_]\w*)(?:(:?[-?])(.*))?', expr, re.S).groups()
        v = dotenv.get(name)
        if v is None or (v == '' and op and op.startswith(':')):
            if op and op.endswith('?'): raise KeyError(f'{name}: {arg}')
            v = arg if op else ''
        return v
    while m := re.search(r'\$\{([^${}]*)\}', value): value = value[:m.start()] + one(m.group(1)) + value[m.end():]
    return value

def image_files() -> dict[str, Path]:
    "Where each file that docker/Dockerfile COPYs from the repository lands in the image: {image path: repo path}."
    out = {}
    for line in re.sub(r'\\\n', ' ', DOCKERFILE.read_text()).splitlines():
        words = line.split()
        if words[:1] == ['COPY'] and not any(w.startswith('--from=') for w in words):
            args = [w for w in words[1:] if not w.startswith('--')]
            for src in args[:-1]: out[args[-1]] = ROOT/src
    return out

def auth_ini() -> configparser.ConfigParser:
    ep = services()['mlflow']['entrypoint']
    path = next(a.split('=', 1)[1] for a in ep if a.startswith('--config='))
    cfg = configparser.ConfigParser(interpolation=None)
    assert cfg.read(image_files()[path]), path
    return cfg


# --------------------------------------------------------------------------------------- static
def test_compose_runs_the_basic_auth_app_through_the_entrypoint():
    mlflow = services()['mlflow']
    ep, cmd = mlflow['entrypoint'], mlflow['command']
    files = image_files()
    assert files[f'/usr/local/bin/{ep[0]}'] == ROOT/'docker'/'mlflow'/'auth_server.py'
    assert ep[-1] == '--' and cmd[:2] == ['mlflow', 'server']
    assert '--app-name=basic-auth' in cmd
    cfg = auth_ini()
    assert cfg['mlflow']['default_permission'] in ('READ', 'NO_PERMISSIONS')
    assert not cfg['mlflow'].get('admin_password'), 'the admin password comes from .env only'
    assert 'MLFLOW_AUTH_CONFIG_PATH' not in env_of(mlflow), 'the entrypoint renders the config; do not bypass it'
    # the health check asks the one path the auth app leaves open
    assert mlflow['healthcheck']['test'][-1].endswith(':5000/health')


def test_credentials_reach_the_containers_only_from_env():
    svcs = services()
    for name, svc in svcs.items():
        for k, v in env_of(svc).items():
            if k.startswith('MLFLOW_') and SECRET.search(k):
                flat = REF.sub('', str(v))
                assert not re.search(r'://[^/@]*:[^/@]+@', flat) and (k.endswith('_URI') or flat == ''), \
                    f'{name}.{k}: a credential must be a ${{...}} reference to .env, got {v!r}'
    server = env_of(svcs['mlflow'])
    for k in ('MLFLOW_AUTH_ADMIN_PASSWORD', 'MLFLOW_WRITER_PASSWORD', 'MLFLOW_READER_PASSWORD', 'MLFLOW_AUTH_DATABASE_URI'):
        assert REF.search(str(server.get(k, ''))), f'mlflow: {k} must come from .env'
    creds = {n: (env_of(s).get('MLFLOW_TRACKING_USERNAME'), env_of(s).get('MLFLOW_TRACKING_PASSWORD')) for n, s in svcs.items()}
    for n in WRITERS: assert creds[n] == (server['MLFLOW_WRITER_USERNAME'], server['MLFLOW_WRITER_PASSWORD']), n
    for n in READERS: assert creds[n] == (server['MLFLOW_READER_USERNAME'], server['MLFLOW_READER_PASSWORD']), n
    assert server['MLFLOW_WRITER_PASSWORD'] != server['MLFLOW_READER_PASSWORD']
    # nobody else holds MLflow credentials (migrate, label sink, producer never talk to MLflow)
    assert {n for n, c in creds.items() if c != (None, None)} == WRITERS | READERS


# ---------------------------------------------------------------------------- the entrypoint alone
def run_entrypoint(env: dict, *command: str, timeout=120) -> subprocess.CompletedProcess:
    ep = services()['mlflow']['entrypoint']
    files = image_files()
    args = [f"--config={files[a.split('=', 1)[1]]}" if a.startswith('--config=') else a for a in ep[1:]]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('MLFLOW_')}
    full_env.update(env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # compose's environment turns telemetry off
    return subprocess.run([sys.executable, str(files[f'/usr/local/bin/{ep[0]}']), *args, *command],
                          env=full_env, capture_output=True, text=True, timeout=timeout)

def dotenv() -> dict:
    "A throwaway .env: the passwords an operator would choose."
    return {k: secrets.token_urlsafe(18) for k in ('POSTGRES_PASSWORD', 'MLFLOW_ADMIN_PASSWORD', 'MLFLOW_WRITER_PASSWORD', 'MLFLOW_READER_PASSWORD')}

def server_env(dot: dict, tmp: Path) -> dict:
    "The mlflow service's environment as compose resolves it, storage swapped for local files."
    env = {k: interpolate(str(v), dot) for k, v in env_of(services()['mlflow']).items()}
    assert env['MLFLOW_AUTH_DATABASE_URI'].endswith('@postgres:5432/mlflow_auth')
    env['MLFLOW_AUTH_DATABASE_URI'] = f'sqlite:///{tmp}/auth.db'
    env['MLFLOW_BACKEND_STORE_URI'] = f'sqlite:///{tmp}/mlflow.db'
    return env


@pytest.mark.parametrize('missing', ['MLFLOW_ADMIN_PASSWORD', 'MLFLOW_WRITER_PASSWORD', 'MLFLOW_READER_PASSWORD'])
def test_entrypoint_refuses_to_start_without_a_password(tmp_path, missing):
    dot = dotenv() | {missing: ''}
    r = run_entrypoint(server_env(dot, tmp_path), 'mlflow', 'server', '--app-name=basic-auth')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert missing.replace('MLFLOW_ADMIN_', 'MLFLOW_AUTH_ADMIN_') in r.stderr
    assert not (tmp_path/'auth.db').exists()


def test_entrypoint_refuses_weak_or_shared_passwords_without_echoing_them(tmp_path):
    dot = dotenv()
    r = run_entrypoint(server_env(dot | {'MLFLOW_READER_PASSWORD': 'short-pw'}, tmp_path), 'mlflow', 'server', '--app-name=basic-auth')
    assert r.returncode == 2 and 'at least 12' in r.stderr and 'short-pw' not in r.stdout + r.stderr
    same = dot | {'MLFLOW_READER_PASSWORD': dot['MLFLOW_WRITER_PASSWORD']}
    r = run_entrypoint(server_env(same, tmp_path), 'mlflow', 'server', '--app-name=basic-auth')
    assert r.returncode == 2 and 'distinct passwords' in r.stderr and dot['MLFLOW_WRITER_PASSWORD'] not in r.stderr


def test_entrypoint_refuses_a_server_without_authentication(tmp_path):
    r = run_entrypoint(server_env(dotenv(), tmp_path), 'mlflow', 'server', '--host=127.0.0.1')
    assert r.returncode == 2 and 'basic-auth' in r.stderr


def password_ok(db: Path, user: str, password: str) -> bool:
    from werkzeug.security import check_password_hash
    with sqlite3.connect(db) as c:
        row = c.execute('SELECT password_hash FROM users WHERE username = ?', (user,)).fetchone()
    return bool(row) and check_password_hash(row[0], password)


def test_entrypoint_creates_the_accounts_and_rotates_passwords_from_env(tmp_path):
    "Run as compose runs it, with `--help` appended so the exec'd server prints its usage and exits."
    dot = dotenv()
    r = run_entrypoint(server_env(dot, tmp_path), *services()['mlflow']['command'][:3], '--help')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'writer' in r.stdout and 'created' in r.stdout and not any(v in r.stdout + r.stderr for v in dot.values())
    db = tmp_path/'auth.db'
    with sqlite3.connect(db) as c:
        users = dict(c.execute('SELECT username, is_admin FROM users').fetchall())
    assert users == {'admin': 1, 'fraud_nb_writer': 0, 'fraud_nb_reader': 0}
    assert password_ok(db, 'fraud_nb_writer', dot['MLFLOW_WRITER_PASSWORD'])
    with sqlite3.connect(db) as c:  # someone made the reader an admin behind the system's back
        c.execute("UPDATE users SET is_admin = 1 WHERE username = 'fraud_nb_reader'")
    new = dot | {'MLFLOW_WRITER_PASSWORD': secrets.token_urlsafe(18)}
    r = run_entrypoint(server_env(new, tmp_path), *services()['mlflow']['command'][:3], '--help')
    assert r.returncode == 0 and "writer 'fraud_nb_writer' updated" in r.stdout, r.stderr[-2000:]
    assert password_ok(db, 'fraud_nb_writer', new['MLFLOW_WRITER_PASSWORD'])
    assert not password_ok(db, 'fraud_nb_writer', dot['MLFLOW_WRITER_PASSWORD'])
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT is_admin FROM users WHERE username = 'fraud_nb_reader'").fetchone() == (0,)


# ------------------------------------------------------------------------------- the real server
@dataclass
class Server:
    url: str
    creds: dict  # compose service -> (username, password), as compose gives them
    admin: tuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def call(server: Server, method: str, path: str, body=None, auth=None, timeout=120) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method, headers={'Content-Type': 'application/json'})
    if auth: req.add_header('Authorization', 'Basic ' + base64.b64encode(f'{auth[0]}:{auth[1]}'.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: code, raw = r.status, r.read()
    except urllib.error.HTTPError as e: code, raw = e.code, e.read()
    try: return code, json.loads(raw)
    except ValueError: return code, raw.decode(errors='replace')


def stop(proc: subprocess.Popen):
    "The server, its uvicorn workers and job consumers share the process group started for it."
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: pass
    try: os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError: pass
    proc.wait(timeout=10)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    try: import flask_wtf  # noqa: F401
    except ImportError: pytest.fail('the basic-auth app needs Flask-WTF: settings.ini requirements must name mlflow[auth]')
    tmp = tmp_path_factory.mktemp('mlflow-auth')
    dot, port = dotenv(), free_port()
    mlflow = services()['mlflow']
    files = image_files()
    ep = [sys.executable, str(files[f"/usr/local/bin/{mlflow['entrypoint'][0]}"])]
    ep += [f"--config={files[a.split('=', 1)[1]]}" if a.startswith('--config=') else a for a in mlflow['entrypoint'][1:]]
    swap = {'--host': '127.0.0.1', '--port': str(port), '--artifacts-destination': str(tmp/'artifacts')}
    cmd = [f'{a.split("=", 1)[0]}={swap[a.split("=", 1)[0]]}' if a.split('=', 1)[0] in swap else a for a in mlflow['command']]
    assert sum(a.split('=', 1)[0] in swap for a in cmd) == len(swap), cmd
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLFLOW_')} | server_env(dot, tmp)
    env['PATH'] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    log = open(tmp/'server.log', 'w')
    proc = subprocess.Popen(ep + cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        url, deadline = f'http://127.0.0.1:{port}', time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f'the server exited ({proc.returncode}):\n' + (tmp/'server.log').read_text()[-3000:]
            try:
                with urllib.request.urlopen(f'{url}/health', timeout=5) as r:
                    if r.status == 200: break
            except OSError: pass
            assert time.monotonic() < deadline, f'no /health within {START_TIMEOUT_S} s:\n' + (tmp/'server.log').read_text()[-3000:]
            time.sleep(0.5)
        creds = {n: (interpolate(env_of(s)['MLFLOW_TRACKING_USERNAME'], dot), interpolate(env_of(s)['MLFLOW_TRACKING_PASSWORD'], dot))
                 for n, s in services().items() if 'MLFLOW_TRACKING_USERNAME' in env_of(s)}
        yield Server(url, creds, (env['MLFLOW_AUTH_ADMIN_USERNAME'], dot['MLFLOW_ADMIN_PASSWORD']))
    finally:
        stop(proc); log.close()
    assert not any(v in (tmp/'server.log').read_text() for v in dot.values()), 'a password reached the server log'


def register(server: Server, versions=2) -> str:
    "As `train` does, with its credentials: a run with a model artifact, a registered model, versions, champion -> 1."
    w, name = server.creds['train'], f'fraud-xgb-{uuid.uuid4().hex[:8]}'
    code, exp = call(server, 'POST', '/api/2.0/mlflow/experiments/create', {'name': name}, w); assert code == 200, exp
    code, run = call(server, 'POST', '/api/2.0/mlflow/runs/create', {'experiment_id': exp['experiment_id']}, w); assert code == 200, run
    art = run['run']['info']['artifact_uri']
    assert art.startswith('mlflow-artifacts:/'), art  # proxied by the server, as in compose
    req = urllib.request.Request(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{art.split(':/', 1)[1].strip('/')}/model/model.txt",
                                 data=name.encode(), method='PUT',
                                 headers={'Authorization': 'Basic ' + base64.b64encode(f'{w[0]}:{w[1]}'.encode()).decode()})
    with urllib.request.urlopen(req, timeout=120) as r: assert r.status == 200
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/create', {'name': name}, w)[0] == 200
    for _ in range(versions):
        code, mv = call(server, 'POST', '/api/2.0/mlflow/model-versions/create',
                        {'name': name, 'source': f'{art}/model', 'run_id': run['run']['info']['run_id']}, w)
        assert code == 200, mv
    assert champion(server, name) is None
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', {'name': name, 'alias': 'champion', 'version': '1'}, w)[0] == 200
    assert champion(server, name) == '1'
    return name


def champion(server: Server, name: str) -> str | None:
    code, body = call(server, 'GET', f'/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion', auth=server.creds['scorer'])
    if code in (400, 404) and 'not found' in str(body): return None  # MLflow 3 answers 400 for an unset alias
    assert code == 200, body
    return body['model_version']['version']


def test_health_answers_anonymously_for_the_compose_health_check(server):
    env = {**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(['sh', str(HEALTHCHECK), 'http', f'{server.url}/health'], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_anonymous_and_wrong_credentials_are_refused(server):
    path = '/api/2.0/mlflow/registered-models/search'
    assert call(server, 'GET', path)[0] == 401
    assert call(server, 'GET', path, auth=(server.creds['train'][0], 'not-the-password-0'))[0] == 401
    assert call(server, 'GET', path, auth=server.creds['scorer'])[0] == 200


def test_moving_champion_needs_the_writer(server):
    name = register(server)
    move = {'name': name, 'alias': 'champion', 'version': '2'}
    code, _ = call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move)
    assert code in (401, 403) and champion(server, name) == '1'
    for svc in sorted(READERS):
        code, _ = call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move, auth=server.creds[svc])
        assert code == 403 and champion(server, name) == '1', svc
        code, _ = call(server, 'DELETE', '/api/2.0/mlflow/registered-models/alias', {'name': name, 'alias': 'champion'}, auth=server.creds[svc])
        assert code == 403 and champion(server, name) == '1', svc
    assert call(server, 'DELETE', '/api/2.0/mlflow/registered-models/alias', {'name': name, 'alias': 'champion'})[0] in (401, 403)
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move, auth=server.creds['retrainer'])[0] == 200
    assert champion(server, name) == '2'


def test_deleting_the_model_needs_the_writer(server):
    name = register(server, versions=1)
    get = f'/api/2.0/mlflow/registered-models/get?name={name}'
    for auth, want in ((None, (401, 403)), (server.creds['scorer'], (403,)), (server.creds['dashboard'], (403,))):
        assert call(server, 'DELETE', '/api/2.0/mlflow/registered-models/delete', {'name': name}, auth=auth)[0] in want
        assert call(server, 'DELETE', '/api/2.0/mlflow/model-versions/delete', {'name': name, 'version': '1'}, auth=auth)[0] in want
        assert call(server, 'GET', get, auth=server.creds['scorer'])[0] == 200 and champion(server, name) == '1'
    assert call(server, 'DELETE', '/api/2.0/mlflow/registered-models/delete', {'name': name}, auth=server.creds['train'])[0] == 200
    assert call(server, 'GET', get, auth=server.creds['scorer'])[0] == 404


CLIENT = r'''
import json, os, sys, tempfile
from mlflow import MlflowClient
c = MlflowClient(sys.argv[1])
mv = c.get_model_version_by_alias(sys.argv[2], 'champion')
path = c.download_artifacts(mv.run_id, 'model/model.txt', tempfile.mkdtemp())
out = {'version': mv.version, 'artifact': open(path).read()}
if len(sys.argv) > 3:
    try: c.set_registered_model_alias(sys.argv[2], 'champion', sys.argv[3]); out['moved'] = True
    except Exception as e: out['moved'] = type(e).__name__ + ': ' + str(e)[:200]
print(json.dumps(out))
'''

def test_the_services_credentials_work_through_the_mlflow_client(server):
    "What the containers do: MlflowClient with MLFLOW_TRACKING_USERNAME/PASSWORD from compose's environment."
    name = register(server)
    def client(svc, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(('MLFLOW_TRACKING', 'MLFLOW_REGISTRY'))}  # keeps telemetry off; no URI left by another test
        env.update(MLFLOW_TRACKING_USERNAME=server.creds[svc][0], MLFLOW_TRACKING_PASSWORD=server.creds[svc][1],
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES='0')
        r = subprocess.run([sys.executable, '-c', CLIENT, server.url, name, *args], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    got = client('scorer', '2')
    assert got['version'] == '1' and got['artifact'] == name  # reads the champion and its artifact
    assert 'PERMISSION_DENIED' in str(got['moved']) or '403' in str(got['moved']), got
    assert champion(server, name) == '1'
    assert client('retrainer', '2')['moved'] is True and champion(server, name) == '2'


def test_an_admin_adds_an_analyst_as_docs_production_says(server):
    "docs/production.md: an admin creates a user (who then reads only) and grants EDIT on a model to let them move aliases."
    name = register(server)
    analyst = (f'analyst-{uuid.uuid4().hex[:6]}', secrets.token_urlsafe(18))
    assert call(server, 'POST', '/api/2.0/mlflow/users/create', {'username': analyst[0], 'password': analyst[1]}, server.creds['train'])[0] == 403
    assert call(server, 'POST', '/api/2.0/mlflow/users/create', {'username': analyst[0], 'password': analyst[1]}, server.admin)[0] == 200
    move = {'name': name, 'alias': 'champion', 'version': '2'}
    assert call(server, 'GET', f'/api/2.0/mlflow/registered-models/get?name={name}', auth=analyst)[0] == 200
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move, auth=analyst)[0] == 403
    grant = {'username': analyst[0], 'resource_type': 'registered_model', 'resource_id': name, 'permission': 'EDIT'}
    # a read-only account cannot hand out authority, not even to itself (the writer, MANAGE on the models it created, could)
    assert call(server, 'POST', '/api/3.0/mlflow/users/permissions/grant', grant, server.creds['scorer'])[0] == 403
    itself = grant | {'username': server.creds['scorer'][0]}
    assert call(server, 'POST', '/api/3.0/mlflow/users/permissions/grant', itself, server.creds['scorer'])[0] == 403
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move, auth=server.creds['scorer'])[0] == 403
    assert call(server, 'POST', '/api/3.0/mlflow/users/permissions/grant', grant, server.admin)[0] == 200
    assert call(server, 'POST', '/api/2.0/mlflow/registered-models/alias', move, auth=analyst)[0] == 200
    assert champion(server, name) == '2'
    gone = {'username': analyst[0]}
    assert call(server, 'DELETE', '/api/2.0/mlflow/users/delete', gone, server.creds['scorer'])[0] == 403
    assert call(server, 'DELETE', '/api/2.0/mlflow/users/delete', gone, server.admin)[0] == 200
    assert call(server, 'GET', f'/api/2.0/mlflow/users/get?username={analyst[0]}', auth=server.admin)[0] == 404
