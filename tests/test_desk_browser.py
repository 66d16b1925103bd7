"""An analyst decides alerts on the desk in a real browser (issue 14, first "Done when").

The real dashboard server (`fraud-nb dashboard`), the real label sink (`fraud-nb labels`, trusting only signed labels of
'producer' and 'analyst'), a registered champion (whose reasons the desk shows) and three scored alerts in PostgreSQL.
Debian's Chromium, driven by playwright, logs in, double-clicks `Fraud` on the top alert (with a note) and clicks
`Legitimate` on the second; a replay of the first decision's POST follows. Then: exactly one audit row and one label per
decision, with the analyst's name and the analyst source; exactly two label messages on the topic; both alerts left
the queue, the third is still there. A screenshot is kept in test-artifacts/desk.png."""
from pathlib import Path

import pytest

from conftest import ARTIFACTS
from scorer_helpers import query, read_topic, start_labels, stop, tail, train_champion, wait_for
from test_dashboard import start_dashboard, stop_dashboard
from test_dashboard_browser import ARGS, CHROMIUM
from test_desk import desk_settings, insert_alerts

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason='Debian chromium missing: run `make browser`')]


def _alerts(settings, version):
    from fraud_nb.data import synthetic_transactions
    df = synthetic_transactions(4000, seed=5, fraud_rate=0.05)
    fraud = df[df.Class == 1].head(3)
    feats = [[r[f'V{i}'] for i in range(1, 29)] for _, r in fraud.iterrows()]
    insert_alerts(settings, [('b-1', 900.0, 0.95), ('b-2', 400.0, 0.9), ('b-3', 10.0, 0.6)], model_version=version, features=feats)


def test_an_analyst_decides_two_alerts_in_a_browser(settings, tmp_path):
    from playwright.sync_api import sync_playwright
    s, token = desk_settings(settings)
    _alerts(s, train_champion(s))
    log = tmp_path/'labels.log'
    sink, dash = start_labels(s, log), None
    try:
        dash, url = start_dashboard(s)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            page.goto(url + 'desk', timeout=120_000)
            page.fill('input[name="name"]', 'ann'); page.fill('input[name="token"]', token)
            page.click('button:text-is("Log in")')
            page.wait_for_selector('[data-testid="analyst"]', timeout=120_000)
            top = page.locator('tr[data-tx="b-1"]')
            assert '(+' in top.inner_text(), 'the top reasons of the scoring model are shown: ' + top.inner_text()
            top.locator('input[name="note"]').fill('card reported stolen <b>bold</b>')
            top.locator('button:text-is("Fraud")').dblclick()
            page.wait_for_selector('[data-testid="msg"]:has-text("b-1")', timeout=120_000)
            page.locator('tr[data-tx="b-2"] button:text-is("Legitimate")').click()
            page.wait_for_selector('[data-testid="msg"]:has-text("Recorded b-2 as Legitimate")', timeout=120_000)
            xsrf = page.get_attribute('input[name="_xsrf"]', 'value')
            replay = page.request.post(url + 'desk/decide', form={'_xsrf': xsrf, 'tx_id': 'b-1', 'label': '0', 'note': 'again'})
            assert replay.ok and 'b-1 was already decided by ann' in replay.text()
            page.reload()
            queued = page.eval_on_selector_all('tr[data-testid="alert"]', 'rows => rows.map(r => r.dataset.tx)')
            assert queued == ['b-3'], queued
            assert 'card reported stolen &lt;b&gt;bold&lt;/b&gt;' in page.content()
            ARTIFACTS.mkdir(exist_ok=True); page.screenshot(path=str(ARTIFACTS/'desk.png'), full_page=True)
            browser.close()
        wait_for(lambda: len(query(s, 'SELECT 1 FROM labels')) == 2, 60, 'the analyst labels stored\n' + tail(log))
    finally:
        if dash is not None: stop_dashboard(dash)
        assert stop(sink) == 0, tail(log)
    assert sorted(query(s, 'SELECT tx_id, label, analyst, model_version, published_at IS NOT NULL, reasons IS NOT NULL FROM decisions')) == [
        ('b-1', 1, 'ann', query(s, "SELECT model_version FROM scored_transactions WHERE tx_id = 'b-1'")[0][0], True, True),
        ('b-2', 0, 'ann', query(s, "SELECT model_version FROM scored_transactions WHERE tx_id = 'b-2'")[0][0], True, True)]
    assert sorted(query(s, 'SELECT tx_id, label, source FROM labels')) == [('b-1', 1, 'analyst'), ('b-2', 0, 'analyst')]
    msgs = read_topic(s, s.topic_labels, 3, timeout=5)
    assert sorted(m.key() for m in msgs) == [b'b-1', b'b-2'], 'one label message per decision'
