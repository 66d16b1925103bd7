"""Champion history and rollback on the session's real embedded stack (PostgreSQL, the MLflow store, the broker): every
alias move is recorded, a move made behind the system's back is detected, rollbacks are refused when the scorers could
not serve the target, and `fraud-nb rollback` mid-stream swaps the scorer within seconds with every row scored once.

The functions' logic (previous champion, pending records without a database) is tested in nbs/06a_history."""
import json, subprocess, time
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from fraud_nb import history
from fraud_nb.db import make_engine
from conftest import service_env, fraud_nb_cmd
from scorer_helpers import wait_for, query, scored_count, train_champion, stop, tail, check_exactly_once, scorer_under_stream


def client_of(settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def recorded(settings) -> list[tuple]:
    "(from, to, actor, who, reason) of every recorded change, newest first, read straight from PostgreSQL."
    return query(settings, 'SELECT from_version, to_version, actor, who, reason FROM champion_history '
                           'WHERE model_name = %s ORDER BY id DESC', (settings.model_name,))


def rollback_cli(settings, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(fraud_nb_cmd('rollback', *args), env=service_env(settings), capture_output=True, text=True, timeout=timeout)


def test_every_move_is_recorded_with_its_tags(settings):
    v1 = train_champion(settings, seed=3)                       # register_model(alias='champion'): a recorded move too
    v2 = train_champion(settings, seed=4, alias=None)
    r = history.set_champion(None, settings, v2, 'promote', 'better on last week', who='ana')
    assert (r['from_version'], r['to_version'], r['recorded'], r['warning']) == (v1, v2, True, None)
    assert recorded(settings) == [(v1, v2, 'promote', 'ana', 'better on last week'),
                                  (None, v1, 'register_model', None, 'registered as champion (no run name)')]
    tags = client_of(settings).get_model_version(settings.model_name, v2).tags
    assert tags['promoted_by'] == 'promote (ana)' and tags['champion_reason'] == 'better on last week' and tags['champion_since'] > '2026'
    assert 'champion_until' in client_of(settings).get_model_version(settings.model_name, v1).tags
    eng = make_engine(settings.database_url)
    try: assert [h['to_version'] for h in history.champion_history(eng, settings.model_name)] == [v2, v1]
    finally: eng.dispose()


def test_cli_promote_is_recorded_with_the_os_user(settings, capsys):
    from fraud_nb.training import promote_main
    v1 = train_champion(settings, seed=3)
    v2 = train_champion(settings, seed=4, alias=None)
    assert promote_main([v2, '--reason', 'ab test won'], settings=settings) == 0, capsys.readouterr().err
    (frm, to, actor, who, reason), *_ = recorded(settings)
    assert (frm, to, actor, reason) == (v1, v2, 'promote', 'ab test won') and who == history.os_user()


def test_reconcile_detects_a_hand_made_move(settings):
    v1 = train_champion(settings, seed=3)
    v2 = train_champion(settings, seed=4, alias=None)
    c, eng = client_of(settings), make_engine(settings.database_url)
    try:
        assert history.reconcile(c, eng, settings) is None
        c.set_registered_model_alias(settings.model_name, 'champion', v2)        # behind the system's back
        found = history.reconcile(c, eng, settings)
        assert (found['from_version'], found['to_version'], found['actor']) == (v1, v2, 'unrecorded')
        assert 'UNRECORDED CHAMPION CHANGE' in found['warning']
        assert history.reconcile(c, eng, settings) is None                       # recorded once
        c.set_registered_model_alias(settings.model_name, 'champion', v1)        # again by hand, then a proper move:
        r = history.set_champion(c, settings, v2, 'promote', 'back to v2')        # the hand move is recorded first
        assert r['reconciled']['actor'] == 'unrecorded'
        assert [row[:3] for row in recorded(settings)] == [(v1, v2, 'promote'), (v2, v1, 'unrecorded'), (v1, v2, 'unrecorded'),
                                                           (None, v1, 'register_model')]
        c.delete_registered_model_alias(settings.model_name, 'champion')        # removing the alias is a change too
        gone = history.reconcile(c, eng, settings)
        assert (gone['from_version'], gone['to_version']) == (v2, None) and 'removed' in gone['warning']
    finally: eng.dispose()


def test_a_scorer_records_a_hand_made_move_before_serving_it(settings):
    "The scorers' model watcher records a champion move the history lacks before it loads that version (issue 17 item 3)."
    from fraud_nb.reload import ModelWatcher, RegistrySource
    v1 = train_champion(settings, seed=3)
    v2 = train_champion(settings, seed=4, alias=None)
    w = ModelWatcher(settings, RegistrySource(settings), listen=False)
    assert w.check() and w.current.version == v1
    client_of(settings).set_registered_model_alias(settings.model_name, 'champion', v2)   # by hand, in MLflow
    assert w.check() and w.pending.version == v2
    assert recorded(settings)[0][:3] == (v1, v2, 'unrecorded')


def _register_unservable(settings) -> str:
    "A version whose declared features this fraud_nb does not compute (as if from another release)."
    from fraud_nb.model import FEATURES
    v = train_champion(settings, seed=9, alias=None)
    c = client_of(settings)
    c.set_model_version_tag(settings.model_name, v, 'features', json.dumps(FEATURES[:-1] + ['hour_of_week']))
    c.set_model_version_tag(settings.model_name, v, 'feature_version', '0')
    return v


def test_rollback_refusals_leave_everything_as_it_was(settings, capsys):
    "The command's refusals, in-process (the command as a process runs in test_rollback_mid_stream)."
    from fraud_nb.history import rollback_main
    v1 = train_champion(settings, seed=3)
    bad = _register_unservable(settings)
    before = recorded(settings)
    capsys.readouterr()
    for args, says in [(('--reason', '  '), 'needs a reason'), (('--to', '99', '--reason', 'x'), 'no version 99'),
                       (('--to', v1, '--reason', 'x'), 'is the champion already'), (('--to', bad, '--reason', 'x'), 'cannot be served'),
                       ((), '--reason TEXT is required'), (('--reason', 'nothing before v1'), 'no earlier champion')]:
        code = rollback_main(list(args), settings=settings)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        ours = [l for l in err.splitlines() if l.startswith('fraud-nb rollback')]   # (MLflow's download bar also writes to stderr)
        assert len(ours) == 1 and says in ours[0] and 'Traceback' not in err, (args, err)
    assert client_of(settings).get_model_version_by_alias(settings.model_name, 'champion').version == int(v1)
    assert recorded(settings) == before


def test_rollback_mid_stream(settings, tmp_path):
    """`fraud-nb rollback` while a scorer scores a stream: the scorer serves the previous champion within 10 s, every
    transaction is scored exactly once (by one version or the other, never mixed back), and the history shows it."""
    v1 = train_champion(settings, seed=3)
    v2 = train_champion(settings, seed=4, alias=None)
    history.set_champion(None, settings, v2, 'retrainer', 'the challenger won')
    s = replace(settings, model_poll_s=2.0)
    log = tmp_path/'scorer.log'
    with scorer_under_stream(s, log, 200_000, rate=800, seed=21, rows_first=1500) as (proc, prod):
        assert query(s, 'SELECT DISTINCT model_version FROM scored_transactions') == [(v2,)]
        t0 = time.monotonic()
        r = rollback_cli(s, '--reason', 'v2 floods the review queue')
        t_cmd = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert f'champion version {v2} -> {v1}' in r.stdout
        wait_for(lambda: query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v1,))[0][0] > 0, 10,
                 f'rows scored by v{v1} within 10 s of the rollback\n' + tail(log))
        t_swap = time.monotonic() - t0 - t_cmd
        n_v1 = query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v1,))[0][0]
        wait_for(lambda: query(s, 'SELECT count(*) FROM scored_transactions WHERE model_version = %s', (v1,))[0][0] > n_v1 + 500,
                 60, f'v{v1} to keep serving')
        prod.r.stop(); prod.join(60)
        sent = prod.summary.sent
        assert prod.summary.failed == 0 and sent < 200_000
        wait_for(lambda: scored_count(s) >= sent, 120, f'all {sent} rows\n' + tail(log))
        assert stop(proc) == 0, tail(log)
    check_exactly_once(s, prod.ids[:sent])
    for part, versions in query(s, 'SELECT kafka_partition, array_agg(model_version ORDER BY kafka_offset) FROM scored_transactions GROUP BY 1'):
        first = versions.index(v1) if v1 in versions else len(versions)
        assert set(versions[:first]) <= {v2} and set(versions[first:]) <= {v1}, f'partition {part} mixes versions after the rollback'
    (frm, to, actor, who, reason), *_ = recorded(s)
    assert (frm, to, actor, who, reason) == (v2, v1, 'rollback', history.os_user(), 'v2 floods the review queue')
    (lag,), = query(s, '''SELECT extract(epoch FROM (SELECT min(scored_at) FROM scored_transactions WHERE model_version = %s)
                                 - (SELECT max(changed_at) FROM champion_history WHERE actor = 'rollback'))''', (v1,))
    assert float(lag) < 10, f'the first row by v{v1} was scored {lag} s after the rollback was recorded'
    counts = dict(query(s, 'SELECT model_version, count(*) FROM scored_transactions GROUP BY 1'))
    print(f'rollback mid-stream: command {t_cmd:.1f} s (process start included), first row by v{v1} {float(lag):.2f} s after the '
          f'recorded change ({t_swap:.1f} s after the command returned); '
          f'{sent:,} transactions scored once each ({counts})')
