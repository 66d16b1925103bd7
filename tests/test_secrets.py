"""Issue 17 item 2: no secret is ever written to a report, a log, a run record or MLflow.

A real retraining run (papermill, MLflow, PostgreSQL) with a database URL that carries a password. The embedded
PostgreSQL trusts its Unix socket, so the password is never checked, but it travels with the URL everywhere the
settings go. Afterwards the password is searched for in every file under reports/, every captured log line, every
column of the run's `retrain_runs` row, and every MLflow param, tag, metric name and artifact of the run and the version.
A failed run (its error text and partial report) is checked too, and so is the service's log."""
import json
import logging
import subprocess
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
from mlflow import MlflowClient

from fraud_nb import db, registry, retrain
from fraud_nb.data import synthetic_transactions
from conftest import fraud_nb_cmd, service_env
from test_retrain import FAST, champion_from, insert_labelled, runs

PASSWORD = 'S3cretPa55word'


def with_password(url: str) -> str:
    "postgresql+psycopg2://postgres:@/db?host=... -> the same URL with a password (ignored by the trusted socket)."
    assert 'postgres:@' in url or 'postgres@' in url, url
    return url.replace('postgres:@', f'postgres:{PASSWORD}@', 1).replace('postgres@', f'postgres:{PASSWORD}@', 1)


def mlflow_texts(s, client: MlflowClient, run_id: str, version: str | None, tmp: Path) -> dict[str, str]:
    "Everything MLflow keeps about a run (params, tags, metric names, every artifact's bytes) and a version (tags, description)."
    run = client.get_run(run_id)
    out = {'params': json.dumps(run.data.params), 'tags': json.dumps(run.data.tags), 'metrics': json.dumps(sorted(run.data.metrics))}
    local = Path(client.download_artifacts(run_id, '', str(tmp)))
    for f in local.rglob('*'):
        if f.is_file(): out[f'artifact:{f.relative_to(local)}'] = f.read_bytes().decode('utf-8', 'replace')
    if version:
        mv = client.get_model_version(s.model_name, version)
        out['version'] = json.dumps({'tags': mv.tags, 'description': mv.description, 'source': mv.source})
    return out


def assert_nowhere(where: dict[str, str]):
    leaks = [k for k, text in where.items() if PASSWORD in text]
    assert not leaks, f'the password leaked into: {leaks}'
    assert where, 'nothing was searched'


def test_a_password_in_the_database_url_is_written_nowhere(settings, tmp_path, caplog):
    s = replace(settings, database_url=with_password(settings.database_url))
    eng = db.make_engine(s.database_url)                               # the password is really in the URL that works
    with eng.connect() as c: assert c.execute(sa.text('SELECT 1')).scalar() == 1
    eng.dispose()
    champion_from(s, synthetic_transactions(20000, seed=21))
    insert_labelled(s, synthetic_transactions(1500, seed=22, fraud_rate=0.05))
    caplog.set_level(logging.DEBUG)
    ok = retrain.run_retraining(s, parameters=FAST)
    # the failed run is also handed the URL as a parameter (as the old `settings_env` did): redaction must still mask it
    failed = retrain.run_retraining(s, parameters={**FAST, 'fail_on_purpose': True, 'note': s.database_url})
    assert ok.status == 'succeeded', ok.error
    assert failed.status == 'failed' and 'failing on purpose' in failed.error
    assert 'postgres:***@' in Path(failed.report_ipynb).read_text()      # the URL reached the report, masked

    where = {}
    reports = sorted(p for p in Path(s.reports_dir).rglob('*') if p.is_file())
    assert {p.suffix for p in reports} >= {'.ipynb', '.html', '.json'} and len(reports) >= 5, reports
    for p in reports: where[f'report:{p.name}'] = p.read_bytes().decode('utf-8', 'replace')
    where['log'] = '\n'.join(r.getMessage() for r in caplog.records) + caplog.text
    assert 'failing on purpose' in where['log']                       # the failure was logged, and searched
    for row in runs(s): where[f"retrain_runs:{row['run_id']}"] = json.dumps(row, default=str)
    assert len([k for k in where if k.startswith('retrain_runs:')]) == 2
    client = MlflowClient(s.mlflow_tracking_uri, s.mlflow_tracking_uri)
    where |= mlflow_texts(s, client, ok.result['mlflow_run_id'], ok.result['challenger_version'], tmp_path/'ok')
    failed_runs = client.search_runs([client.get_experiment_by_name(s.experiment).experiment_id],
                                     f"tags.`fraud_nb.retrain_run` = '{failed.run_id}'")
    assert len(failed_runs) == 1
    where |= {f'failed-{k}': v for k, v in mlflow_texts(s, client, failed_runs[0].info.run_id, None, tmp_path/'failed').items()}
    assert any(k.startswith('artifact:report/') for k in where), sorted(where)   # the report really went to MLflow
    assert_nowhere(where)
    # and the report still says what happened
    html = Path(ok.report_html).read_text()
    assert ('is promoted to champion' in html or 'the champion stays' in html) and 'interval' in html


def test_the_retrain_command_does_not_print_the_password(settings, tmp_path):
    "`fraud-nb retrain --now` as a user runs it: nothing it prints carries the password, even when the run fails."
    s = replace(settings, database_url=with_password(settings.database_url), mlflow_tracking_uri='')   # no registry: it fails
    env = service_env(s)
    env.pop('FRAUD_NB_MLFLOW_TRACKING_URI', None)
    env['FRAUD_NB_STATE_DIR'] = str(tmp_path/'no-stack')                  # no stack file to fill the registry in from
    p = subprocess.run(fraud_nb_cmd('retrain', '--now'), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and (p.stdout + p.stderr).strip()
    assert PASSWORD not in p.stdout + p.stderr, p.stdout + p.stderr


def test_label_secrets_are_redacted_and_kept_from_the_kernel():
    "The label sources' HMAC keys count as secrets: masked in anything a run writes, and not handed to its kernel."
    from fraud_nb.config import get_settings
    from fraud_nb.retrain import secrets_of, kernel_env, redact
    key = 'producer-key-0123456789'
    s = get_settings({'FRAUD_NB_LABEL_SECRETS': f'producer:{key}'})
    assert key in secrets_of(s, env={})
    assert key not in redact(f'labels signed with {key}', secrets_of(s, env={}))
    assert 'FRAUD_NB_LABEL_SECRETS' not in kernel_env(s, base={})
