"""Seed spread of the model's figures on the real dataset: mean ± std and min–max over seeds, not one lucky draw.

    .venv/bin/python benchmarks/seed_spread.py [--seeds 0,1,2,3,4] [--alerts-per-day 250]

Reads the Kaggle file at $CREDITCARD_CSV (default ../shared/data/creditcard.csv.gz next to the repository; without it the
script says so and exits 0). For each seed, trains exactly as `fraud-nb train` does (fraud_nb.model.train_model on the first
80 % by Time: 60 % train, 20 % validation for early stopping and the threshold, then refit) and evaluates on the last 20 %:
average precision, ROC AUC, and precision/recall at two operating points:

- the cost-minimising threshold chosen on the validation part (what the model ships with; it moves between seeds because
  a few validation frauds decide where the cost curve bottoms out);
- an alert budget: flag the `--alerts-per-day` highest scores per day (the threshold is the score quantile of the test
  window's own traffic, no labels used, as a service would calibrate it on yesterday's scores), which fixes the alert volume.

Prints a markdown table (mean ± std, min–max) and the threshold spreads; the README quotes it.
"""
import argparse, os, sys, time
from pathlib import Path

import numpy as np

from fraud_nb.compare import alert_budget_threshold, spread_text, summarize_over_seeds, threshold_spread, train_over_seeds
from fraud_nb.data import load_transactions, time_split
from fraud_nb.evaluation import evaluate
from fraud_nb.model import train_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent/'shared'/'data'/'creditcard.csv.gz'

ROWS = [('average_precision', 'average precision (test)', 4), ('roc_auc', 'ROC AUC (test)', 4),
        ('threshold', 'cost threshold (chosen on validation)', 4), ('precision', 'precision at the cost threshold', 3),
        ('recall', 'recall at the cost threshold', 3), ('alerts_per_day', 'alerts per day at the cost threshold', 0),
        ('saved_fraction', 'cost saved vs flagging nothing', 3), ('budget_threshold', 'alert-budget threshold', 4),
        ('budget_precision', 'precision at the alert budget', 3), ('budget_recall', 'recall at the alert budget', 3),
        ('n_trees', 'trees', 0), ('train_seconds', 'training time (s)', 0)]


def seed_metrics(train, valid, test, seed: int, *, review_cost: float, alerts_per_day: float, days: float, n_estimators: int) -> dict:
    "Train with `seed` as `fraud-nb train` does; the test figures at the cost threshold and at the alert budget."
    t0 = time.perf_counter()
    model = train_model(train, valid, review_cost=review_cost, seed=seed, n_estimators=n_estimators)
    seconds = time.perf_counter() - t0
    p = model.predict_proba(test)
    m = evaluate(p, test, review_cost=review_cost, threshold=model.threshold)
    tb = alert_budget_threshold(p, alerts_per_day, days)
    b = evaluate(p, test, review_cost=review_cost, threshold=tb)
    out = dict(seed=seed, **{k: m[k] for k in ('average_precision', 'roc_auc', 'threshold', 'precision', 'recall', 'saved_fraction')},
               alerts_per_day=m['alerts'] / days, budget_threshold=tb, budget_precision=b['precision'], budget_recall=b['recall'],
               n_trees=model.metrics['n_trees'], train_seconds=seconds)
    print(f"seed {seed}: AP {out['average_precision']:.4f}, ROC AUC {out['roc_auc']:.4f}, threshold {out['threshold']:.4f} "
          f"(precision {out['precision']:.3f}, recall {out['recall']:.3f}); budget threshold {tb:.4f} (precision "
          f"{out['budget_precision']:.3f}, recall {out['budget_recall']:.3f}); {seconds:.0f} s", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=os.environ.get('CREDITCARD_CSV', str(DEFAULT_DATA)), help='the Kaggle creditcard file ($CREDITCARD_CSV)')
    ap.add_argument('--seeds', default='0,1,2,3,4', help='comma-separated seeds')
    ap.add_argument('--alerts-per-day', type=float, default=250.0, help='the alert budget (about the data\'s frauds per day)')
    ap.add_argument('--review-cost', type=float, default=5.0)
    ap.add_argument('--n-estimators', type=int, default=600, help='most boosting rounds (as fraud-nb train)')
    a = ap.parse_args(argv)
    if not Path(a.data).is_file():
        print(f'seed_spread: skipped, no dataset at {a.data} (set CREDITCARD_CSV to the Kaggle creditcard.csv[.gz])'); return 0
    df = load_transactions(a.data)
    train, valid, test = time_split(df, (0.6, 0.2, 0.2))
    days = (test.Time.max() - test.Time.min()) / 86_400
    print(f'{a.data}: train {len(train):,} ({train.Class.sum()} frauds), validation {len(valid):,} ({valid.Class.sum()}), '
          f'test {len(test):,} ({test.Class.sum()} frauds, {days * 24:.1f} h); {os.cpu_count()} cores', file=sys.stderr)
    seeds = [int(s) for s in a.seeds.split(',')]
    runs = train_over_seeds(lambda s: seed_metrics(train, valid, test, s, review_cost=a.review_cost, alerts_per_day=a.alerts_per_day,
                                                   days=days, n_estimators=a.n_estimators), seeds)
    summary = summarize_over_seeds(runs)
    print(f'Seeds {a.seeds}; train on the first 80 % by Time, test on the last 20 % ({len(test):,} transactions, {test.Class.sum()} frauds); '
          f'alert budget {a.alerts_per_day:g} per day.\n')
    print('| figure | mean ± std (min–max) over seeds |\n|---|---|')
    for key, name, digits in ROWS: print(f'| {name} | {spread_text(summary, key, digits)} |')
    for key, name in (('threshold', 'cost threshold'), ('budget_threshold', 'alert-budget threshold')):
        s = threshold_spread([r[key] for r in runs])
        print(f"\n{name}: {s['mean']:.4f} ± {s['std']:.4f}, {s['min']:.4f}–{s['max']:.4f} (max/min {s['ratio']:.2f})", end='')
    print()
    return 0


if __name__ == '__main__':
    sys.exit(main())
