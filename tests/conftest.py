"""Shared fixtures: one real embedded stack per test session, isolated topics and schema per test.

- `stack`: PostgreSQL, the Tansu broker and the MLflow store, started once in a temporary state
  directory and always stopped at the end of the session, also when tests fail.
- `settings`: a `Settings` for one test: its own database (migrated), its own topics (created), its
  own registered-model name and MLflow experiment, so tests never see each other's data.
- `service_env(settings)`: the environment that starts a `fraud-nb` process with those settings.
"""
import os, sys, uuid
from dataclasses import replace
from pathlib import Path

import pytest

for k in [k for k in os.environ if k.startswith('FRAUD_NB_')]: del os.environ[k]  # tests choose their own settings

from fraud_nb.config import get_settings, to_env   # also sets MLFLOW_DISABLE_TELEMETRY for this process and its children
from fraud_nb import db
from fraud_nb.stack import Stack, ensure_topics

ROOT = Path(__file__).resolve().parents[1]
# The real creditcard dataset, for the tests that need it (they skip without it): the path in CREDITCARD_CSV,
# else this checkout's optional default (a copy next to the repository).
REAL_DATA = Path(os.environ.get('CREDITCARD_CSV') or ROOT.parent/'shared'/'data'/'creditcard.csv.gz')
ARTIFACTS = ROOT/'test-artifacts'

# `make test` runs two xdist workers, a group of tests each (--dist loadgroup): a group per file, so a file's module
# fixtures stay in one process. The files that load both cores (10M- and 1M-row loads, the bench) and the one that
# times the dashboard's answers under attack share one group: they never run at the same time as each other.
HEAVY_OR_TIMED = {'test_dashboard_scale.py', 'test_desk_scale.py', 'test_scorer.py', 'test_security.py'}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group('heavy-or-timed' if name in HEAVY_OR_TIMED else name))


@pytest.fixture(scope='session')
def stack(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp('stack')/'state'
    st = Stack(get_settings({}, state_dir=state_dir))
    try:
        st.up(say=lambda m: None)
        yield st
    finally:
        st.down(say=lambda m: None)


@pytest.fixture
def settings(stack, tmp_path):
    "Settings for one test: fresh database, topics, model name and experiment on the session's stack."
    tag = uuid.uuid4().hex[:10]
    base = stack.service_settings()
    dbname = f't_{tag}'
    url = db.with_database(base.database_url, dbname)
    db.create_database(base.database_url, dbname)
    eng = db.make_engine(url)
    db.migrate(eng); eng.dispose()
    s = replace(base, database_url=url,
                topic_transactions=f'tx-{tag}', topic_labels=f'labels-{tag}', topic_alerts=f'alerts-{tag}',
                topic_dlq=f'tx-{tag}.dlq', topic_labels_dlq=f'labels-{tag}.dlq', scorer_group=f'scorer-{tag}', labels_group=f'labels-{tag}',
                model_name=f'fraud-xgb-{tag}', experiment=f'exp-{tag}',
                reports_dir=tmp_path/'reports', data_path=tmp_path/'no-dataset.csv', mlflow_artifact_root=(tmp_path/'mlartifacts').as_uri())
    ensure_topics(s)
    yield s
    try: db.drop_database(base.database_url, dbname)
    except Exception: pass


def service_env(settings) -> dict:
    "Environment for a `fraud-nb` child process that runs with `settings`."
    return {**os.environ, **to_env(settings), 'PYTHONUNBUFFERED': '1'}


def fraud_nb_cmd(*args) -> list[str]:
    return [sys.executable, '-m', 'fraud_nb.cli', *args]
