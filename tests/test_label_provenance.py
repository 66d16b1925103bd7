"""Labels have a provenance (issue 17 item 4), against the real broker, PostgreSQL and a `fraud-nb labels` process.

With FRAUD_NB_LABEL_SECRETS set, a label signed by a configured source is stored with its source; a forged label (its
content changed after signing, or signed with a guessed key), an unsigned one and one from an unknown source land in the
labels dead-letter topic with their reasons and not in `labels` (retraining reads `labels`: it learns only from accepted
labels). Without secrets the sink accepts unsigned labels and says so in its log.
"""
import secrets
from dataclasses import replace

from confluent_kafka import Producer

from fraud_nb.contracts import encode_label, read_dead_letter, sign_label
from fraud_nb.stream import label_encoder
from scorer_helpers import query, read_topic, start_labels, stop, tail, wait_for

T0 = '2026-11-01T10:00:00Z'


def _send(settings, items):
    p = Producer({'bootstrap.servers': settings.kafka_bootstrap})
    for key, value in items: p.produce(settings.topic_labels, value, key=key)
    assert p.flush(10) == 0


def _labels(settings) -> dict:
    return {t: (y, src) for t, y, src in query(settings, 'SELECT tx_id, label, source FROM labels')}


def test_refused_labels_go_to_the_labels_dlq(settings, tmp_path):
    key, analyst = secrets.token_hex(16), secrets.token_hex(16)
    s = replace(settings, label_secrets=f'producer:{key},analyst:{analyst}', topic_labels_dlq=f'{settings.topic_labels}.dlq')
    signed = label_encoder(s)('p-1', 1, T0, terminal_id='T1', event_time=T0)          # what `fraud-nb produce` sends
    tampered = sign_label('p-3', 0, T0, source='producer', secret=key.encode()).replace(b'"label":0', b'"label":1')
    refused = {'p-3': 'forged label',
               'p-4': 'forged label',                         # signed as producer with a guessed key
               'p-5': 'unsigned label: no source',
               'p-6': 'unsigned label: no signature',
               'p-7': "unknown label source 'mallory'",
               'p-1': 'forged label'}                         # a forged correction of an accepted label
    _send(s, [('p-1', signed), ('p-2', sign_label('p-2', 1, T0, source='analyst', secret=analyst.encode())), ('p-3', tampered),
              ('p-4', sign_label('p-4', 1, T0, source='producer', secret=b'guessed-guessed-guessed')),
              ('p-5', encode_label('p-5', 1, T0)), ('p-6', encode_label('p-6', 1, T0, source='producer')),
              ('p-7', sign_label('p-7', 1, T0, source='mallory', secret=b'mallory-mallory-mallory')),
              ('p-1', sign_label('p-1', 0, T0, source='producer', secret=b'guessed-guessed-guessed'))])
    log = tmp_path/'labels.log'
    sink = start_labels(s, log)
    try:
        wait_for(lambda: len(_labels(s)) >= 2, 60, 'the two signed labels stored\n' + tail(log))
        dead = [read_dead_letter(m) for m in read_topic(s, s.topic_labels_dlq, len(refused), timeout=60)]
    finally: assert stop(sink) == 0, tail(log)
    assert _labels(s) == {'p-1': (1, 'producer'), 'p-2': (1, 'analyst')}, 'only signed labels of configured sources, with their source'
    assert len(dead) == len(refused), dead
    for d in dead:
        assert refused[d['key'].decode()] in d['reason'], d
        assert d['topic'] == s.topic_labels and d['scorer'].startswith('labels-')
    assert sorted(d['key'].decode() for d in dead) == sorted(refused)
    text = log.read_text()
    assert 'accepting only labels signed by: analyst, producer' in text
    assert key not in text and analyst not in text, 'no secret in the log'


def test_without_secrets_unsigned_labels_are_accepted_loudly(settings, tmp_path):
    _send(settings, [('u-1', encode_label('u-1', 1, T0))])
    log = tmp_path/'labels.log'
    sink = start_labels(settings, log)
    try: wait_for(lambda: _labels(settings) == {'u-1': (1, 'producer')}, 60, 'the unsigned label stored\n' + tail(log))
    finally: assert stop(sink) == 0, tail(log)
    assert 'ACCEPTING UNSIGNED LABELS' in log.read_text()


def test_a_chargeback_overrides_an_earlier_analyst_decision(settings, tmp_path):
    """Analyst labels first; then a chargeback that disagrees wins (and gets a new seq: retraining sees it), a producer label
    that agrees takes over the source (same seq: nothing new to learn), and a later analyst label changes nothing.
    Retraining's query (`labelled_stream` up to the newest watermark) returns the winners."""
    from fraud_nb import db
    from fraud_nb.desk import review_queue
    from fraud_nb.retrain import labelled_stream, labels_since
    from test_desk import insert_alerts
    keys = {k: secrets.token_hex(16) for k in ('producer', 'analyst', 'chargeback')}
    s = replace(settings, label_secrets=','.join(f'{k}:{v}' for k, v in keys.items()))
    insert_alerts(s, [('c-1', 10.0, 0.9), ('c-2', 20.0, 0.8), ('c-3', 30.0, 0.7), ('c-4', 40.0, 0.6)])   # c-4: never labelled
    sign = lambda t, y, src: (t, sign_label(t, y, T0, source=src, secret=keys[src].encode()))
    seqs = lambda: {t: q for t, q in query(s, 'SELECT tx_id, seq FROM labels')}
    log = tmp_path/'labels.log'
    sink = start_labels(s, log)
    try:
        _send(s, [sign('c-1', 0, 'analyst'), sign('c-2', 1, 'analyst')])
        wait_for(lambda: len(_labels(s)) == 2, 60, 'the analyst labels stored\n' + tail(log))
        before = seqs()
        _send(s, [sign('c-1', 1, 'chargeback'), sign('c-2', 1, 'producer')])
        wait_for(lambda: _labels(s) == {'c-1': (1, 'chargeback'), 'c-2': (1, 'producer')}, 60, 'the ground truth stored\n' + tail(log))
        _send(s, [sign('c-1', 0, 'analyst'), sign('c-2', 0, 'analyst'), sign('c-3', 1, 'analyst')])   # c-3 marks the end
        wait_for(lambda: 'c-3' in _labels(s), 60, 'the last analyst label stored\n' + tail(log))
    finally: assert stop(sink) == 0, tail(log)
    assert _labels(s) == {'c-1': (1, 'chargeback'), 'c-2': (1, 'producer'), 'c-3': (1, 'analyst')}, 'an analyst never overrides ground truth'
    after = seqs()
    assert after['c-1'] > max(before.values()) and after['c-2'] == before['c-2'], 'a changed label is new to the retrainer, a confirmed one is not'
    eng = db.make_engine(s.database_url)
    try:
        n, watermark = labels_since(eng, 0)
        got = labelled_stream(eng, watermark).set_index('tx_id')['Class'].to_dict()
    finally: eng.dispose()
    assert n == 3 and got == {'c-1': 1, 'c-2': 1, 'c-3': 1}, got
    settled = query(s, 'SELECT tx_id FROM scored_transactions WHERE settled ORDER BY tx_id')
    assert settled == [('c-1',), ('c-2',), ('c-3',)], f'the sink took the labelled alerts off the queue index: {settled}'
    eng = db.make_engine(s.database_url)
    try: assert [r['tx_id'] for r in review_queue(eng)] == ['c-4']
    finally: eng.dispose()
