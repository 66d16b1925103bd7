"""The analyst's desk over HTTP against the real dashboard server and PostgreSQL (issue 14 items 1-3, 5).

`fraud-nb dashboard` runs as a subprocess with one configured analyst and label secrets; alerts are scored rows
inserted into `scored_transactions`. An unauthenticated decision (with a valid XSRF token) and a decision without
the XSRF token are refused and write nothing; an analyst's note containing HTML is shown as text to others.
"""
import re
import secrets
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest
import requests

from fraud_nb.desk import analyst_line
from fraud_nb.pg import pg_params
from scorer_helpers import query
from test_dashboard import start_dashboard, stop_dashboard

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)


def desk_settings(settings):
    "The test's settings with one analyst ('ann') and label secrets for the producer and the desk; returns (settings, token)."
    token = secrets.token_urlsafe(18)
    s = replace(settings, analysts=analyst_line('ann', token) + ',' + analyst_line('bob', token + 'b'),
                label_secrets=f'producer:{secrets.token_hex(16)},analyst:{secrets.token_hex(16)}')
    return s, token


def execute(settings, sql, rows):
    "Run `sql` once per parameter tuple in `rows`, committed."
    conn = psycopg2.connect(**pg_params(settings.database_url), connect_timeout=5)
    try:
        with conn, conn.cursor() as cur: cur.executemany(sql, rows)
    finally: conn.close()


def insert_alerts(settings, alerts: list[tuple], model_version='1', features=None, card=None):
    "Insert scored, flagged rows `(tx_id, amount, probability)` (with V1..V28 `features` if given)."
    feats = features if features is not None else [[0.0] * 28] * len(alerts)
    execute(settings, '''INSERT INTO scored_transactions (tx_id, event_time, tx_time, amount, features, probability, is_fraud, threshold,
                              model_version, scored_at, kafka_partition, kafka_offset, scorer_id, card_id)
                            VALUES (%s, %s, %s, %s, %s, %s, %s, 0.5, %s, now(), 0, %s, 'test', %s)''',
            [(t, T0 + timedelta(seconds=k), float(k), amount, list(map(float, f)), p, p >= 0.5, model_version, k, card)
             for k, ((t, amount, p), f) in enumerate(zip(alerts, feats))])


def xsrf(session, url) -> str:
    "The `_xsrf` token of the page at `url` (its cookie is set on the session)."
    r = session.get(url + 'desk', headers={'Accept': 'text/html'}, timeout=120)
    assert r.status_code == 200, r.text[:500]
    return re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)


def login(session, url, name, token):
    r = session.post(url + 'desk/login', data={'_xsrf': xsrf(session, url), 'name': name, 'token': token}, timeout=120)
    assert r.status_code == 200 and f'logged in as <b data-testid="analyst">{name}</b>' in r.text, r.text[:2000]


def counts(settings, tx_id):
    return (query(settings, 'SELECT count(*) FROM decisions WHERE tx_id = %s', (tx_id,))[0][0],
            query(settings, 'SELECT count(*) FROM labels WHERE tx_id = %s', (tx_id,))[0][0])


@pytest.fixture
def desk(settings):
    s, token = desk_settings(settings)
    insert_alerts(s, [('a-1', 500.0, 0.9), ('a-2', 100.0, 0.8), ('a-3', 50.0, 0.7), ('n-1', 900.0, 0.1)])
    p, url = start_dashboard(s)
    try: yield s, token, url
    finally: stop_dashboard(p)


def test_unauthenticated_decisions_are_refused_and_write_nothing(desk):
    s, token, url = desk
    anon = requests.Session()
    page = anon.get(url + 'desk', headers={'Accept': 'text/html'}, timeout=120).text
    assert 'a-1' in page and 'n-1' not in page, 'the queue is open to look at; unflagged rows are not in it'
    assert page.index('a-1') < page.index('a-2') < page.index('a-3'), 'highest expected loss first'
    assert '>Fraud</button>' not in page and 'log in to decide' in page
    tok = xsrf(anon, url)
    r = anon.post(url + 'desk/decide', data={'_xsrf': tok, 'tx_id': 'a-1', 'label': '1'}, timeout=30, allow_redirects=False)
    assert r.status_code == 403
    forged = requests.Session()   # a logged-in analyst's cookie is useless to a cross-site form without the XSRF token
    login(forged, url, 'ann', token)
    r = forged.post(url + 'desk/decide', data={'tx_id': 'a-1', 'label': '1'}, timeout=30, allow_redirects=False)
    assert r.status_code == 403
    r = anon.post(url + 'desk/login', data={'_xsrf': tok, 'name': 'ann', 'token': 'wrong-token-123'}, timeout=120)
    assert 'not recognised' in r.text and 'logged in as' not in r.text
    r = anon.post(url + 'desk/rollback', data={'_xsrf': tok, 'reason': 'x'}, timeout=30, allow_redirects=False)
    assert r.status_code == 403
    assert query(s, 'SELECT count(*) FROM decisions')[0][0] == 0, 'nothing was written'


def test_a_note_with_html_is_shown_as_text(desk):
    s, token, url = desk
    ann, bob = requests.Session(), requests.Session()
    login(ann, url, 'ann', token)
    note = '<script>alert(1)</script><img src=x onerror=alert(2)>'
    r = ann.post(url + 'desk/decide', data={'_xsrf': xsrf(ann, url), 'tx_id': 'a-2', 'label': '0', 'note': note}, timeout=120)
    assert r.status_code == 200 and 'Recorded a-2 as Legitimate' in r.text, r.text[:2000]
    assert query(s, 'SELECT analyst, label, note, model_version, probability, threshold FROM decisions') == [('ann', 0, note, '1', 0.8, 0.5)]
    login(bob, url, 'bob', token + 'b')
    page = bob.get(url + 'desk', timeout=120)
    assert '&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;' in page.text
    assert '<script>' not in page.text and '<img' not in page.text
    assert "default-src 'none'" in page.headers['Content-Security-Policy']
    r = bob.post(url + 'desk/decide', data={'_xsrf': xsrf(bob, url), 'tx_id': 'a-2', 'label': '1'}, timeout=120)
    assert 'a-2 was already decided by ann' in r.text, 'a second analyst changes nothing'
    r = bob.post(url + 'desk/decide', data={'_xsrf': xsrf(bob, url), 'tx_id': 'a-3', 'label': '1', 'note': 'x' * 501}, timeout=120)
    assert r.status_code == 400
    assert query(s, 'SELECT tx_id, analyst, label FROM decisions') == [('a-2', 'ann', 0)]
    assert query(s, 'SELECT tx_id FROM scored_transactions WHERE settled') == [('a-2',)], 'the decision took the alert off the queue index'
    assert query(s, 'SELECT published_at IS NOT NULL FROM decisions') == [(True,)], 'the label reached the broker'
    assert 'a-2' not in page.text.split('Latest decisions')[0], 'a decided alert leaves the queue'


def test_a_decision_left_unpublished_by_a_crash_is_published_once(settings):
    "The outbox: an audit row whose label never reached the broker (a crash in between) is published by `publish_pending`, once."
    from fraud_nb import db
    from fraud_nb.contracts import parse_label_secrets, verify_label
    from fraud_nb.desk import publish_pending
    from fraud_nb.stream import make_producer
    from scorer_helpers import read_topic
    s, _ = desk_settings(settings)
    insert_alerts(s, [('o-1', 10.0, 0.9), ('o-2', 10.0, 0.9)])
    execute(s, '''INSERT INTO decisions (tx_id, label, analyst, model_version, probability, threshold) VALUES (%s, %s, 'ann', '1', 0.9, 0.5)''',
            [('o-1', 1)])
    eng, producer = db.make_engine(s.database_url), make_producer(s)
    try:
        assert publish_pending(eng, producer, s) == 1 and publish_pending(eng, producer, s) == 0
    finally: eng.dispose()
    msgs = read_topic(s, s.topic_labels, 2, timeout=5)
    assert len(msgs) == 1 and msgs[0].key() == b'o-1'
    row, why = verify_label(msgs[0].value(), parse_label_secrets(s.label_secrets))
    assert why is None and row[:2] == ('o-1', 1) and row[5] == 'analyst'
    assert query(s, 'SELECT tx_id FROM decisions WHERE published_at IS NOT NULL') == [('o-1',)]


def test_an_analyst_rolls_the_champion_back_from_the_desk(settings):
    "The desk's rollback is `fraud_nb.history.rollback` with the analyst as `who`; the history page shows it."
    pytest.importorskip('fraud_nb.history')
    from fraud_nb import registry
    from scorer_helpers import train_champion
    s, token = desk_settings(settings)
    v1 = train_champion(s, seed=3)
    v2 = train_champion(s, seed=4)
    assert registry.champion_version(s) == v2
    p, url = start_dashboard(s)
    try:
        ann = requests.Session()
        login(ann, url, 'ann', token)
        page = ann.get(url + 'desk/history', timeout=120).text
        assert 'Roll back</button>' in page
        r = ann.post(url + 'desk/rollback', data={'_xsrf': xsrf(ann, url), 'reason': 'v2 <flags> too much'}, timeout=120)
        assert r.status_code == 200 and f'Champion rolled back to version {v1}' in r.text, r.text[-2000:]
        assert 'v2 &lt;flags&gt; too much' in r.text and '<flags>' not in r.text
    finally: stop_dashboard(p)
    assert registry.champion_version(s) == v1
    assert ('rollback', 'ann', 'v2 <flags> too much') in query(s, 'SELECT actor, who, reason FROM champion_history')
