"""Model quality on the real dataset: the time-ordered evaluation behind the figures in the docs.

    .venv/bin/python benchmarks/model_quality.py [--data PATH] [--variants default,no_refit,...]

The dataset: --data, else $CREDITCARD_CSV, else the user's copy in data/raw_data/ (creditcard.csv or .csv.gz).

Trains on the first 80 % by `Time` (60 % train, 20 % validation for early stopping and the threshold), tests on the last
20 %, exactly as `fraud-nb train` does, for the default configuration and for the alternatives that were compared
(resampling instead of weighting, other weights, no refit, the raw features only). Prints a markdown table: average
precision with a 95 % stratified-bootstrap interval, ROC AUC, precision and recall at the chosen threshold, the cost
saved against flagging nothing, and the training time. Needs no services.
"""
import argparse, os, sys, time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from fraud_nb.config import DEFAULT_REVIEW_COST
from fraud_nb.data import DatasetSource
from fraud_nb.model import train_model
from fraud_nb.evaluation import evaluate, bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get('CREDITCARD_CSV') or next(
    (str(p) for p in (ROOT/'data'/'raw_data'/'creditcard.csv', ROOT/'data'/'raw_data'/'creditcard.csv.gz') if p.is_file()), None)

# name -> keyword arguments of train_model (on top of the defaults, which `fraud-nb train` uses)
VARIANTS = {
    'default': dict(refit=True),
    'no_refit': dict(refit=False),
    'smote': dict(refit=True, resample='smote'),
    'undersample': dict(refit=True, resample='undersample'),
    'spw_balanced': dict(refit=True, params=dict(scale_pos_weight='balanced')),
    'spw_1': dict(refit=True, params=dict(scale_pos_weight=1)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=DEFAULT_DATA, help='the creditcard dataset (default: $CREDITCARD_CSV, else data/raw_data/)')
    ap.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated, from {", ".join(VARIANTS)}')
    ap.add_argument('--review-cost', type=float, default=DEFAULT_REVIEW_COST)
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args(argv)
    if not a.data: ap.error('no dataset: pass --data PATH or set CREDITCARD_CSV')
    parts = DatasetSource.file(a.data).parts()   # the split of `fraud-nb train`
    df, train, valid, test = parts['all'], parts['train'], parts['valid'], parts['test']
    print(f'{a.data}: {len(df):,} rows; train {len(train):,} ({train.Class.sum()} frauds), valid {len(valid):,} '
          f'({valid.Class.sum()}), test {len(test):,} ({test.Class.sum()}); {os.cpu_count()} cores', file=sys.stderr)
    rows = []
    for name in a.variants.split(','):
        kw = VARIANTS[name]
        t0 = time.perf_counter()
        model = train_model(train, valid, review_cost=a.review_cost, seed=a.seed, **kw)
        seconds = time.perf_counter() - t0
        m = evaluate(model, test, review_cost=a.review_cost)
        p = model.predict_proba(test)
        lo, hi = bootstrap_ci(test.Class.to_numpy(), p, average_precision_score, n_boot=300, seed=0)
        row = (f"| {name} | {m['average_precision']:.4f} [{lo:.3f}, {hi:.3f}] | {m['roc_auc']:.4f} | {m['threshold']:.3f} | "
               f"{m['precision']:.3f} | {m['recall']:.3f} | {m['tp']}/{m['fp']}/{m['fn']} | {m['saved_vs_flag_none']:,.0f} of "
               f"{m['cost_flag_none']:,.0f} ({m['saved_fraction']:.0%}) | {m['precision_at_100']:.2f} | {model.metrics['n_trees']} | {seconds:.0f} s |")
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print('| variant | test AP [95 % CI] | ROC AUC | threshold | precision | recall | TP/FP/FN | cost saved vs flag nothing '
          '| precision@100 | trees | training |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
