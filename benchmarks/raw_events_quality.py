"""Raw events: behavioural features against the raw fields alone, on simulated data, with the delay-aware evaluation.

    .venv/bin/python benchmarks/raw_events_quality.py [--seeds 0,1,2] [--days 60] [--customers 5000] [--terminals 10000]

For each seed: simulate a history (`fraud_nb.simulator`), compute the `raw_events` features over the whole history
(`fraud_nb.features.RAW_EVENTS.batch`: labels known 7 days after their transaction), split it with
`fraud_nb.evaluation.delay_split` (test: the last 7 days; skipped: the 7 delay days before; train: everything earlier;
cards with a fraud in the last 7 training days removed from test), and train the same XGBoost twice:

- behavioural: every `raw_events` feature (card windows, terminal risk from known labels, time of day, amount);
- raw fields only: amount, hour, weekend, night.

XGBoost is trained with fraud_nb.model.DEFAULT_PARAMS (scale_pos_weight 25), early-stopped on the last 7 days of the
training window, then refitted on the whole training window with 1.25 x the best number of trees (as `train_model` does).
Prints per seed and mean +- standard deviation over seeds: average precision, ROC AUC and card precision@100.
Needs no services.
"""
import argparse, time

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.metrics import average_precision_score, roc_auc_score

from fraud_nb.evaluation import card_precision_at_k, delay_split
from fraud_nb.features import RAW_EVENTS
from fraud_nb.model import DEFAULT_PARAMS
from fraud_nb.simulator import simulate

RAW_ONLY = ['amount', 'hour', 'weekend', 'night']
MODELS = {'behavioural': list(RAW_EVENTS.features), 'raw fields only': RAW_ONLY}


def fit_predict(X, y, train_idx, valid_days_mask, test_idx, seed):
    "Early-stop on the latest training days, refit on all training rows, score the test rows."
    p = {**DEFAULT_PARAMS, 'seed': seed, 'nthread': 2}
    fit, val = train_idx[~valid_days_mask], train_idx[valid_days_mask]
    b = xgb.train(p, xgb.DMatrix(X[fit], y[fit]), 600, evals=[(xgb.DMatrix(X[val], y[val]), 'valid')],
                  early_stopping_rounds=80, verbose_eval=False)
    b = xgb.train(p, xgb.DMatrix(X[train_idx], y[train_idx]), int(round((b.best_iteration + 1) * 1.25)))
    return b.inplace_predict(X[test_idx])


def one_seed(seed, days, customers, terminals):
    t0 = time.perf_counter()
    h = simulate(days=days, customers=customers, terminals=terminals, seed=seed)
    F = RAW_EVENTS.batch(h).astype(np.float32)
    t_feat = time.perf_counter() - t0
    train, test = delay_split(h, test_days=7, delay_days=7)
    day = pd.to_datetime(train.event_time, utc=True).dt.floor('D')
    valid = (day >= day.max() - pd.Timedelta(days=6)).to_numpy()
    y = h.Class.to_numpy()
    out = {}
    for name, cols in MODELS.items():
        X = F[:, [RAW_EVENTS.features.index(c) for c in cols]]
        s = fit_predict(X, y, train.index.to_numpy(), valid, test.index.to_numpy(), seed)
        out[name] = dict(average_precision=average_precision_score(test.Class, s), roc_auc=roc_auc_score(test.Class, s),
                         card_precision_at_100=card_precision_at_k(test, s, k=100))
    info = dict(rows=len(h), fraud_rate=h.Class.mean(), train=len(train), test=len(test), test_frauds=int(test.Class.sum()),
                seconds_features=round(t_feat, 1), seconds=round(time.perf_counter() - t0, 1))
    return out, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--seeds', default='0,1,2'); ap.add_argument('--days', type=int, default=60)
    ap.add_argument('--customers', type=int, default=5_000); ap.add_argument('--terminals', type=int, default=10_000)
    a = ap.parse_args(argv)
    rows = []
    for seed in [int(s) for s in a.seeds.split(',')]:
        res, info = one_seed(seed, a.days, a.customers, a.terminals)
        print(f'seed {seed}: {info}', flush=True)
        for name, m in res.items():
            print(f'  {name:16s} ' + '  '.join(f'{k} {v:.3f}' for k, v in m.items()), flush=True)
            rows.append(dict(seed=seed, model=name, **m))
    df = pd.DataFrame(rows)
    summary = df.groupby('model', sort=False)[['average_precision', 'roc_auc', 'card_precision_at_100']].agg(['mean', 'std'])
    print(f'\n{len(df.seed.unique())} seeds, {a.days} days, {a.customers} customers, {a.terminals} terminals; test = last 7 days, delay 7 days')
    print('| model | average precision | ROC AUC | card precision@100 |\n|---|---|---|---|')
    for name in MODELS:
        r = summary.loc[name]
        print(f'| {name} | ' + ' | '.join(f'{r[(k, "mean")]:.3f} ± {r[(k, "std")]:.3f}'
                                           for k in ('average_precision', 'roc_auc', 'card_precision_at_100')) + ' |')


if __name__ == '__main__':
    main()
