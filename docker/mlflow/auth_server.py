#!/usr/bin/env python
"""Start the MLflow server of docker-compose.yml with authentication (MLflow's basic-auth app).

The `mlflow` service runs it as its entrypoint (installed as /usr/local/bin/fraud-nb-mlflow-auth):

    fraud-nb-mlflow-auth --config=/etc/fraud_nb/mlflow_basic_auth.ini -- mlflow server --app-name=basic-auth ...

1. renders the auth configuration: docker/mlflow/basic_auth.ini with `database_uri` taken from
   $MLFLOW_AUTH_DATABASE_URI (it holds a password, so it lives only in a 0600 file of a private
   temporary directory), and points MLFLOW_AUTH_CONFIG_PATH at it;
2. makes the auth database hold the three accounts of the stack with the passwords of the
   environment (.env), creating them or resetting their password and admin flag, so .env is their
   one source of truth and rotating a password is: edit .env, `docker compose up -d`:
     admin   $MLFLOW_AUTH_ADMIN_USERNAME (default: the ini's admin_username) / $MLFLOW_AUTH_ADMIN_PASSWORD
     writer  $MLFLOW_WRITER_USERNAME / $MLFLOW_WRITER_PASSWORD   `train` and the retrainer
     reader  $MLFLOW_READER_USERNAME / $MLFLOW_READER_PASSWORD   scorers, dashboard, JupyterLab
   Other users (analysts, operators added by an admin) are left alone;
3. replaces itself with the command after `--` (which must run the basic-auth app), with the
   account passwords removed from its environment.

Exit status 2 with one line on stderr when the configuration is unusable (missing or short
password, two accounts sharing a name or a password, no database URL, no basic-auth app).
"""
from __future__ import annotations

import argparse, configparser, os, secrets, sys, tempfile
from pathlib import Path

ACCOUNTS = (  # role, username variable, default username, password variable, is_admin
    ('admin', 'MLFLOW_AUTH_ADMIN_USERNAME', None, 'MLFLOW_AUTH_ADMIN_PASSWORD', True),
    ('writer', 'MLFLOW_WRITER_USERNAME', 'fraud_nb_writer', 'MLFLOW_WRITER_PASSWORD', False),
    ('reader', 'MLFLOW_READER_USERNAME', 'fraud_nb_reader', 'MLFLOW_READER_PASSWORD', False),
)
MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)


class ConfigProblem(Exception): pass


def accounts(env, admin_default: str | None) -> list[tuple[str, str, str, bool]]:
    "(role, username, password, is_admin) of each account, checked."
    out = []
    for role, user_var, default, pw_var, admin in ACCOUNTS:
        user = env.get(user_var) or (admin_default if role == 'admin' else default)
        password = env.get(pw_var) or ''
        if not user: raise ConfigProblem(f'set {user_var} (the {role} user of MLflow)')
        if len(password) < MIN_PASSWORD:
            raise ConfigProblem(f'set {pw_var} in .env to a password of at least {MIN_PASSWORD} characters (the {role} user of MLflow)')
        out.append((role, user, password, admin))
    for i in (1, 2):
        if len({a[i] for a in out}) < len(out):
            raise ConfigProblem(f"the MLflow admin, writer and reader accounts need distinct {('', 'names', 'passwords')[i]}")
    return out


def render_config(template: Path, database_uri: str) -> Path:
    "The ini with database_uri set, in a new private directory; MLflow reads it at every worker's start."
    cfg = configparser.ConfigParser(interpolation=None)
    if not cfg.read(template, encoding='utf-8'): raise ConfigProblem(f'{template}: no such auth configuration')
    cfg['mlflow']['database_uri'] = database_uri
    path = Path(tempfile.mkdtemp(prefix='mlflow-auth-'))/'basic_auth.ini'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'w', encoding='utf-8') as f: cfg.write(f)
    return path


def sync_users(database_uri: str, wanted) -> list[str]:
    "Create each account or reset its password and admin flag; returns what was done (no secret)."
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore  # reads MLFLOW_AUTH_CONFIG_PATH at import
    store = SqlAlchemyStore()
    store.init_db(database_uri)
    done = []
    for role, user, password, admin in wanted:
        if store.has_user(user, use_primary=True):
            store.update_user(user, password=password, is_admin=admin); done.append(f'{role} {user!r} updated')
        else:
            store.create_user(user, password, is_admin=admin); done.append(f'{role} {user!r} created')
    return done


def app_name(cmd: list[str]) -> str | None:
    "The --app-name an `mlflow server` command line asks for (None: the plain server)."
    for i, a in enumerate(cmd):
        if a.startswith('--app-name='): return a.split('=', 1)[1]
        if a == '--app-name' and i + 1 < len(cmd): return cmd[i + 1]
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog='fraud-nb-mlflow-auth', description=__doc__.split('\n')[0])
    p.add_argument('--config', type=Path, default=Path('/etc/fraud_nb/mlflow_basic_auth.ini'), help='the auth ini (template)')
    p.add_argument('command', nargs=argparse.REMAINDER, help='-- mlflow server --app-name=basic-auth ...')
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ['--'] else args.command
    try:
        if cmd[:2] != ['mlflow', 'server'] or app_name(cmd) != 'basic-auth':
            raise ConfigProblem(f'the command must be `mlflow server --app-name=basic-auth ...`, not {" ".join(cmd[:3])!r}')
        database_uri = os.environ.get('MLFLOW_AUTH_DATABASE_URI', '')
        if not database_uri: raise ConfigProblem('set MLFLOW_AUTH_DATABASE_URI (the database of the MLflow users)')
        template = configparser.ConfigParser(interpolation=None)
        template.read(args.config, encoding='utf-8')
        wanted = accounts(os.environ, template.get('mlflow', 'admin_username', fallback=None))
        os.environ['MLFLOW_AUTH_CONFIG_PATH'] = str(render_config(args.config, database_uri))
    except ConfigProblem as e:
        print(f'fraud-nb-mlflow-auth: {e}', file=sys.stderr)
        return 2
    os.environ['MLFLOW_AUTH_ADMIN_USERNAME'] = wanted[0][1]
    # the CSRF key of the user-creation form: one per start unless .env fixes it (workers inherit it)
    if not os.environ.get('MLFLOW_FLASK_SERVER_SECRET_KEY'): os.environ['MLFLOW_FLASK_SERVER_SECRET_KEY'] = secrets.token_urlsafe(32)
    for line in sync_users(database_uri, wanted): print(f'fraud-nb-mlflow-auth: {line}', flush=True)
    for account in ACCOUNTS: os.environ.pop(account[3], None)
    sys.stdout.flush(); sys.stderr.flush()
    os.execvp(cmd[0], cmd)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
