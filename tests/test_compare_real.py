"""Issue 13's loop-replay reproduction on the real data: a leaked holdout shows AP ~1.0, the leak-proof one keeps the champion.

`fraud-nb produce --loop --unseen` replays the last 20 % of the Kaggle file again and again under fresh tx_ids. Once a second
pass is labelled, the newest 30 % of the labelled stream (the old holdout) is made of copies of rows the challenger trained
on. This test builds that stream offline (two passes, >= 80,000 labels, 100 tx/s, labels 30 s late), trains a champion on
the first 80 % by time and challengers the way retraining does (history + older stream, the newest 20 % of that for early
stopping and the threshold), and checks that

- the naive holdout shows the leak (challenger AP >= 0.98; 0.990 measured), so the test fails if the reproduction stops
  reproducing it;
- `leakproof_split` drops every holdout row whose content either model trained on, and `decide` does not promote, and no
  AP >= 0.999 is reported, both with the default split (the newest half is all replays: no evidence) and with a holdout
  reaching back into the first pass for 30 unseen frauds. (There the challenger differs from the champion by its threshold
  only: the same 29 of 40 frauds caught, 46 fewer false alarms, -230 in cost. Without the bootstrap's two pseudo-frauds
  that interval would be [-306, -154] and promote; one ordinary fraud between the two thresholds would undo the saving.)

Reads $CREDITCARD_CSV (default ../shared/data/creditcard.csv.gz); skipped without it. Fewer trees and one thread keep it
well under two minutes on two cores. Needs no services.
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from fraud_nb import retrain
from fraud_nb.compare import content_key, decide, leakproof_split, paired_bootstrap
from fraud_nb.config import Settings
from fraud_nb.data import LABEL, RAW_COLUMNS, load_transactions, time_split
from fraud_nb.model import train_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('CREDITCARD_CSV', ROOT.parent/'shared'/'data'/'creditcard.csv.gz'))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not DATA.is_file(), reason=f'the real dataset is not at {DATA} (set CREDITCARD_CSV)')]

FAST = dict(n_estimators=150, early_stopping_rounds=30, params=dict(nthread=1))
RATE, DELAY_S, PASSES = 100.0, 30.0, 2


def loop_stream(unseen: pd.DataFrame, passes: int) -> pd.DataFrame:
    "What `produce --loop` sends and the label sink stores: `passes` replays, fresh tx_ids, event times at RATE per second."
    d = unseen.sort_values('Time', kind='stable').reset_index(drop=True)
    s = pd.concat([d.assign(tx_id=[f'loop.{p}-{i}' for i in range(len(d))]) for p in range(passes)], ignore_index=True)
    return s.assign(event_time=pd.Timestamp('2026-11-30', tz='UTC') + pd.to_timedelta(np.arange(len(s)) / RATE, unit='s'))


def train_like_retraining(pool: pd.DataFrame):
    "The retraining notebook's challenger: the newest 20 % of its training pool for early stopping and the threshold."
    cut = int(len(pool) * 0.8)
    return train_model(pool.iloc[:cut][RAW_COLUMNS + [LABEL]], pool.iloc[cut:][RAW_COLUMNS + [LABEL]], **FAST)


@pytest.fixture(scope='module')
def replay():
    df = load_transactions(DATA)
    train, valid, unseen = time_split(df, (0.6, 0.2, 0.2))
    champion = train_model(train, valid, **FAST)          # `fraud-nb train`: the first 80 % by time
    history = pd.concat([train, valid], ignore_index=True)
    stream = loop_stream(unseen, PASSES)
    return history, stream, champion


def judge(champion, challenger, holdout, **decide_kw):
    y, a = holdout[LABEL].to_numpy(), holdout['Amount'].to_numpy()
    p0, p1 = champion.predict_proba(holdout), challenger.predict_proba(holdout)
    boot = paired_bootstrap(y, p0, p1, a, (champion.threshold, challenger.threshold), n_boot=1000)
    return boot, decide(boot, **decide_kw)


def test_the_reproduction_has_enough_labels(replay):
    history, stream, _ = replay
    assert len(stream) >= 80_000 and stream.tx_id.is_unique
    keys = content_key(stream)
    assert pd.Series(keys).duplicated().sum() >= len(stream) // PASSES - 10   # pass 2 is pass 1 again (bar the file's own duplicates)


def test_the_naive_holdout_leaks(replay):
    history, stream, _ = replay
    n_hold = int(round(len(stream) * 0.3))                 # the old rule: the newest 30 % of the labelled stream
    holdout = stream.iloc[-n_hold:]
    challenger = train_like_retraining(pd.concat([history, stream.iloc[:-n_hold]], ignore_index=True))
    ap = average_precision_score(holdout[LABEL], challenger.predict_proba(holdout))
    print(f'naive holdout: {len(holdout):,} transactions, {holdout[LABEL].sum()} frauds, challenger AP {ap:.4f}')
    assert np.isin(content_key(holdout), content_key(stream.iloc[:-n_hold])).all()  # every holdout row was trained on
    assert ap >= 0.98   # 0.990 with these 150 trees; 1.000 with the 400 of the retraining notebook (issue 13)


@pytest.mark.parametrize('reach', ['default', 'back_into_pass_1'])
def test_the_leakproof_holdout_keeps_the_champion(replay, reach):
    history, stream, champion = replay
    kw = dict(min_holdout_frauds=30, max_holdout_fraction=0.9) if reach == 'back_into_pass_1' else {}
    train, holdout, counts = leakproof_split(history, stream, time_col='event_time', delay=DELAY_S, champion_train=history, **kw)
    print(reach, counts)
    # nothing judged was trained on, by content, by either model; training ends a label delay before the holdout starts
    assert not np.isin(content_key(holdout), content_key(train)).any()
    assert not pd.Series(content_key(holdout)).duplicated().any()
    assert train.event_time.max() < counts['train_end'] == counts['holdout_start'] - pd.Timedelta(seconds=DELAY_S)
    assert not (holdout.event_time < counts['holdout_start']).any()
    assert counts['replays_of_challenger_training'] > 0
    challenger = train_like_retraining(train)
    boot, d = judge(champion, challenger, holdout, look=1)
    print(d.verdict)
    assert not d.promote
    for key in ('ap_champion', 'ap_challenger'): assert not boot.observed[key] >= 0.999, (key, boot.observed)
    if reach == 'default':   # the newest half is all replays: only the replays of the gap's rows are left, too few frauds
        assert counts['holdout'] <= counts['stream_in_gap'] and d.verdict.startswith('Not enough evidence yet')
    else:                    # a real comparison on 30+ frauds no model has seen
        assert counts['holdout_frauds'] >= 30 and holdout.tx_id.str.startswith('loop.0-').mean() > 0.9


def test_the_retraining_code_path_keeps_the_champion(replay):
    "The same reproduction through what the retraining notebook calls: retrain.split_run (label delay and 30 frauds from the"
    "settings, the champion's training rows) and retrain.judge (paired bootstrap, decide at the look): no promotion, no AP ~1."
    history, stream, champion = replay
    s = Settings(label_delay_s=DELAY_S, promote_min_frauds=30)
    split = retrain.split_run(history, stream, s)
    print(split.counts)
    assert not np.isin(content_key(split.holdout), content_key(split.train)).any()
    assert split.counts['replays_of_challenger_training'] + split.counts['replays_of_champion_training'] > 0
    challenger = train_like_retraining(split.train)
    hold = split.holdout
    boot, d = retrain.judge(hold, champion.predict_proba(hold), challenger.predict_proba(hold),
                            (champion.threshold, challenger.threshold), s, look=1, n_boot=1000)
    print(d.verdict)
    assert not d.promote
    for key in ('ap_champion', 'ap_challenger'): assert not boot.observed[key] >= 0.999, (key, boot.observed)
