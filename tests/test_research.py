"""The research notebook (nbs/research.ipynb) under papermill against a throwaway stack.

A champion trained on synthetic data is registered; a labelled synthetic stream goes the real way (the
producer's Kafka messages, `fraud-nb score` and `fraud-nb labels` into PostgreSQL); the notebook runs in a
kernel whose environment is the test's settings, as JupyterLab's kernels get the running system's."""
import json
import subprocess
import sys
from dataclasses import replace

import nbformat

from conftest import ROOT, fraud_nb_cmd, service_env
from scorer_helpers import query, start_scorer, stop, tail, wait_for
from fraud_nb import registry, training
from fraud_nb.data import DatasetSource, synthetic_transactions
from fraud_nb.model import train_model

NOTEBOOK = ROOT/'nbs'/'research.ipynb'


def register_champion(settings) -> str:
    "A small champion fitted on the history of 20,000 synthetic transactions; its `data` tag names them."
    source = DatasetSource.generated(20_000, seed=3, fraud_rate=0.01)
    parts = source.parts()
    model = train_model(parts['train'], parts['valid'], n_estimators=40, seed=3)
    return registry.register_model(model, settings, metrics={}, tags=training.data_tags(source), alias='champion')


def stream_labelled(settings, tmp_path, n: int, rate: float):
    "`n` labelled synthetic transactions through Kafka, the real scorer and the label sink; wait until all are joined."
    from fraud_nb.stream import Replayer
    logs = {k: tmp_path/f'{k}.log' for k in ('scorer', 'labels')}
    scorer = start_scorer(settings, logs['scorer'])
    labels = subprocess.Popen(fraud_nb_cmd('labels'), env=service_env(settings), stdout=open(logs['labels'], 'ab'),
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:                      # both read their topics from the start: the stream can go while they start
        df = synthetic_transactions(n, seed=12, fraud_rate=0.05, drift=0.5)   # drift: newer data has something to teach
        summary = Replayer(settings, df, rate=rate, label_delay_s=0).run(progress=False)
        assert summary.delivered == n and summary.labels_delivered == n, summary.line()
        joined = lambda: query(settings, 'SELECT count(*) FROM scored_transactions JOIN labels USING (tx_id)')[0][0] >= n
        wait_for(joined, 120, f'{n:,} scored and labelled transactions\n{tail(logs["scorer"])}\n{tail(logs["labels"])}')
    finally:
        stop(scorer); stop(labels)


def run_notebook(settings, tmp_path, name: str, **params) -> tuple[subprocess.CompletedProcess, nbformat.NotebookNode]:
    "papermill on nbs/research.ipynb in a python3 kernel whose environment holds `settings`; the result and the output notebook."
    out, pfile = tmp_path/f'{name}.ipynb', tmp_path/f'{name}-params.yaml'
    pfile.write_text(json.dumps(params))   # JSON is YAML
    r = subprocess.run([sys.executable, '-m', 'papermill', str(NOTEBOOK), str(out), '-k', 'python3', '-f', str(pfile),
                        '--execution-timeout', '300', '--no-progress-bar', '--cwd', str(ROOT)],
                       env=service_env(settings), capture_output=True, text=True, timeout=480)
    return r, nbformat.read(out, as_version=4)


def outputs(nb) -> tuple[str, int]:
    "All text the executed notebook shows (markdown, plain text, errors) and its number of PNG figures."
    texts, pngs = [], 0
    for c in nb.cells:
        for o in c.get('outputs', []):
            data = o.get('data', {})
            texts += [data.get('text/markdown', ''), data.get('text/plain', ''), o.get('text', ''), o.get('evalue', '')]
            pngs += 'image/png' in data
    return '\n'.join(map(str, texts)), pngs


def test_research_notebook_compares_and_registers_a_challenger(settings, tmp_path):
    s = replace(settings, label_delay_s=0.0)
    v1 = register_champion(s)
    stream_labelled(s, tmp_path, n=3000, rate=250)
    r, nb = run_notebook(s, tmp_path, 'research', register=True, n_estimators=80, seed=1,
                         candidate_params={'max_depth': 4, 'learning_rate': 0.1})
    assert r.returncode == 0, r.stderr[-4000:]
    text, pngs = outputs(nb)
    # the comparison is shown: decide()'s verdict sentence (twice: against the champion, against the default parameters)
    assert 'Candidate against the champion.' in text and text.count('(rule: promote when the holdout has >= ') == 2, text[-3000:]
    assert '**3,000 transactions, 150 frauds**' in text          # every transaction of the stream, scored and labelled
    assert pngs >= 3, f'{pngs} figures'                 # PR curves, the bootstrap differences, the prequential blocks
    # the registry: a new version as challenger with the research tag and its metrics; the champion did not move
    v2 = registry.alias_version(s, registry.CHALLENGER)
    assert v2 is not None and v2 != v1 and registry.champion_version(s) == v1
    assert f'Registered **{s.model_name} v{v2}** as `challenger`' in text and f'`champion` stays at v{v1}' in text
    client = registry.MlflowClient(s.mlflow_tracking_uri, s.mlflow_tracking_uri)
    tags = client.get_model_version(s.model_name, v2).tags
    assert tags['fraud_nb.origin'] == 'research' and tags['fraud_nb.compared_with'] == v1 and tags['data'] == 'synthetic:20000:seed=3:fraud_rate=0.01'
    assert json.loads(tags['fraud_nb.candidate_params']) == {'max_depth': 4, 'learning_rate': 0.1}
    assert tags['fraud_nb.verdict'] in text and tags['fraud_nb.would_promote'] in ('true', 'false')
    # the evidence as a retrained version carries it (retrain.evidence_tags), and the newest stream row it trained on
    assert tags['fraud_nb.evidence.verdict'] == tags['fraud_nb.verdict'] and json.loads(tags['fraud_nb.evidence.look']) == 1
    assert json.loads(tags['fraud_nb.evidence.promote']) == (tags['fraud_nb.would_promote'] == 'true')
    assert tags['fraud_nb.train_end'] > '2026'
    metrics = json.loads(tags['metrics'])
    assert metrics['holdout_frauds'] >= 10 and 0 < metrics['holdout_average_precision'] <= 1
    assert metrics['holdout_cost_diff_low'] <= metrics['holdout_cost_diff_vs_champion'] <= metrics['holdout_cost_diff_high']
    logged = client.get_run(tags['run_id']).data
    assert logged.metrics['holdout_cost'] == metrics['holdout_cost'] and logged.params['max_depth'] == '4'
    assert registry.load_version(s, v2).threshold == float(tags['threshold'])


def test_research_notebook_says_what_is_missing(settings, tmp_path):
    "No champion, then no labels: the run stops with one clear message each time, and registers nothing."
    r, nb = run_notebook(settings, tmp_path, 'no-champion', register=True)
    text, _ = outputs(nb)
    assert r.returncode != 0 and 'NothingToCompare' in r.stderr
    assert f"Stopped: '{settings.model_name}' has no champion yet" in text and 'fraud-nb train' in text
    v1 = register_champion(settings)
    r, nb = run_notebook(settings, tmp_path, 'no-labels', register=True)
    text, _ = outputs(nb)
    assert r.returncode != 0 and 'Stopped: there are no labelled transactions yet' in text, r.stderr[-3000:]
    assert registry.alias_version(settings, registry.CHALLENGER) is None and registry.champion_version(settings) == v1
