"""Data validation, the time split, features, training and the cost-minimising threshold (no services needed)."""
import gzip
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fraud_nb.data import (COLUMNS, RAW_COLUMNS, LABEL, DataValidationError, load_transactions, synthetic_transactions,
                           time_split, find_dataset)
from fraud_nb.model import FEATURES, make_features, train_model
from fraud_nb.evaluation import choose_threshold, expected_cost, evaluate, cost_curve, bootstrap_ci


# ---------------------------------------------------------------- loading and validation

GOOD = synthetic_transactions(50, seed=11)


def write_csv(tmp_path, edit=None, name='tx.csv', text=None):
    path = tmp_path/name
    if text is not None:
        path.write_text(text); return path
    d = GOOD.astype(object)
    if edit: d = edit(d)
    d.to_csv(path, index=False)
    return path


def error_of(path) -> str:
    with pytest.raises(DataValidationError) as e: load_transactions(path)
    return str(e.value)


def set_cell(row, col, value):
    def edit(d):
        d.loc[row, col] = value
        return d
    return edit


def test_good_file_round_trip(tmp_path):
    df = load_transactions(write_csv(tmp_path))
    assert list(df.columns) == COLUMNS
    pd.testing.assert_frame_equal(df, GOOD, check_dtype=False)
    assert df[LABEL].dtype == np.int64


def test_gzip_and_column_order_accepted(tmp_path):
    path = tmp_path/'tx.csv.gz'
    GOOD[COLUMNS[::-1]].to_csv(path, index=False)
    with gzip.open(path) as f: assert f.readline().startswith(b'Class,Amount')
    assert list(load_transactions(path).columns) == COLUMNS


def test_wrong_column_is_named(tmp_path):
    msg = error_of(write_csv(tmp_path, lambda d: d.rename(columns={'V12': 'V12x'})))
    assert "missing column(s) 'V12'" in msg and "unexpected column(s) 'V12x'" in msg and 'line 1' in msg


def test_missing_column_is_named(tmp_path):
    msg = error_of(write_csv(tmp_path, lambda d: d.drop(columns=['Amount'])))
    assert "missing column(s) 'Amount'" in msg


def test_non_numeric_value_names_column_and_row(tmp_path):
    msg = error_of(write_csv(tmp_path, set_cell(6, 'V4', 'abc')))
    assert "column 'V4'" in msg and "'abc'" in msg and 'row 7' in msg


def test_class_2_names_column_and_row(tmp_path):
    msg = error_of(write_csv(tmp_path, set_cell(9, 'Class', 2)))
    assert "column 'Class' must be 0 or 1, found 2 in row 10" in msg


def test_missing_feature_names_column_and_row(tmp_path):
    msg = error_of(write_csv(tmp_path, set_cell(2, 'V20', None)))
    assert "column 'V20' has a missing value in row 3" in msg


def test_first_bad_row_is_reported(tmp_path):
    def edit(d):
        d.loc[30, 'Time'] = 'x'; d.loc[12, 'Time'] = 'late?'
        return d
    assert 'row 13' in error_of(write_csv(tmp_path, edit))


def test_empty_and_headless_files(tmp_path):
    assert 'empty' in error_of(write_csv(tmp_path, text=''))
    assert 'no rows' in error_of(write_csv(tmp_path, text=','.join(COLUMNS) + '\n'))
    with pytest.raises(FileNotFoundError): load_transactions(tmp_path/'nope.csv')


def test_find_dataset(tmp_path):
    from fraud_nb.config import Settings
    assert find_dataset(Settings(data_path=tmp_path/'creditcard.csv')) is None
    write_csv(tmp_path, name='creditcard.csv.gz')
    assert find_dataset(Settings(data_path=tmp_path/'creditcard.csv')) == tmp_path/'creditcard.csv.gz'


# ---------------------------------------------------------------- synthetic data and the time split

def test_synthetic_is_deterministic_and_realistic():
    a, b = synthetic_transactions(30_000, seed=5), synthetic_transactions(30_000, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == COLUMNS and a.Time.is_monotonic_increasing
    assert a.Time.between(0, 172_800).all() and (a.Amount >= 0).all()
    assert a.Class.sum() == round(30_000 * 0.0017)
    assert synthetic_transactions(1000, fraud_rate=0.05).Class.sum() == 50


def test_time_split_orders_by_time():
    df = synthetic_transactions(10_000, seed=2).sample(frac=1, random_state=0)  # shuffled
    train, valid, test = time_split(df)
    assert (len(train), len(valid), len(test)) == (6000, 2000, 2000)
    assert train.Time.max() <= valid.Time.min() <= valid.Time.max() <= test.Time.min()
    assert test.Time.min() >= train.Time.max()  # no test row earlier than a training row
    assert sorted(pd.concat([train, valid, test]).index) == sorted(df.index)


def test_time_split_rejects_bad_fractions():
    with pytest.raises(ValueError): time_split(GOOD, (0.5, 0.6))
    with pytest.raises(ValueError): time_split(GOOD, (1.0,))


# ---------------------------------------------------------------- the threshold

def test_threshold_hand_example():
    y = [0, 0, 1, 1]; p = [0.1, 0.4, 0.35, 0.8]; amount = [10.0, 10.0, 100.0, 3.0]
    # flag nothing 103; >=0.8: 100; >=0.4: 105; >=0.35: 5; everything: 10
    assert list(cost_curve(y, p, amount)[1]) == [103, 100, 105, 5, 10]
    t = choose_threshold(y, p, amount, review_cost=5)
    assert 0.1 < t <= 0.35 and expected_cost(y, p, amount, t) == 5
    t = choose_threshold(y, p, amount, review_cost=200)
    assert 0.4 < t <= 0.8 and expected_cost(y, p, amount, t, review_cost=200) == 100


def test_threshold_brute_force_agrees():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.1).astype(int)
    p = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), 2)  # ties on purpose
    a = rng.exponential(40, 400)
    t = choose_threshold(y, p, a, review_cost=5)
    best = min(expected_cost(y, p, a, c, 5) for c in np.r_[np.unique(p), 1.01])
    assert expected_cost(y, p, a, t, 5) == pytest.approx(best)


def test_evaluate_counts():
    df = pd.DataFrame({'Class': [0, 0, 1, 1], 'Amount': [10.0, 10.0, 100.0, 3.0]})
    m = evaluate(np.array([0.1, 0.4, 0.35, 0.8]), df, threshold=0.3, top_k=(2,))
    assert (m['tp'], m['fp'], m['tn'], m['fn'], m['alerts']) == (2, 1, 1, 0, 3)
    assert (m['cost'], m['cost_flag_none'], m['cost_flag_all'], m['saved_vs_flag_none']) == (5, 103, 10, 98)
    assert m['precision_at_2'] == 0.5 and m['threshold_source'] == 'given'


def test_bootstrap_ci_contains_estimate():
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.02).astype(int); p = np.clip(rng.normal(0.2 + 0.4 * y, 0.2), 0, 1)
    from sklearn.metrics import average_precision_score
    lo, hi = bootstrap_ci(y, p, average_precision_score, n_boot=100)
    assert lo < average_precision_score(y, p) < hi


# ---------------------------------------------------------------- features and the model

@pytest.fixture(scope='module')
def small_model():
    train, valid, test = time_split(synthetic_transactions(40_000, seed=4, fraud_rate=0.01))
    return train_model(train, valid, n_estimators=60, params=dict(learning_rate=0.2)), test


def test_make_features_uses_raw_columns_only():
    df = synthetic_transactions(500, seed=1)
    X = make_features(df)
    assert X.shape == (500, len(FEATURES)) and X.dtype == np.float32
    np.testing.assert_array_equal(make_features(df[RAW_COLUMNS[::-1]]), X)
    with pytest.raises(KeyError, match='Amount'): make_features(df.drop(columns='Amount'))


def test_model_predicts_and_explains(small_model):
    model, test = small_model
    p = model.predict_proba(test)
    assert p.shape == (len(test),) and ((p >= 0) & (p <= 1)).all()
    assert evaluate(model, test)['average_precision'] > 0.5
    reasons = model.top_reasons(make_features(test.iloc[np.argsort(-p)[:3]]))
    assert len(reasons) == 3 and all(r and all(f in FEATURES and c > 0 for f, c in r) for r in reasons)


def test_feature_mismatch_is_refused(small_model):
    model, _ = small_model
    model.check_compatible()
    with pytest.raises(ValueError, match='lacks'): replace(model, features=FEATURES[:-1]).check_compatible()
    with pytest.raises(ValueError, match="version '99'"): replace(model, feature_version='99').check_compatible()
    with pytest.raises(ValueError, match='another order'): replace(model, features=FEATURES[::-1]).check_compatible()


@pytest.mark.parametrize('resample', ['smote', 'undersample'])
def test_resampling_trains(resample):
    train, valid, test = time_split(synthetic_transactions(20_000, seed=6, fraud_rate=0.01))
    model = train_model(train, valid, resample=resample, n_estimators=30, params=dict(learning_rate=0.3))
    assert model.params['resample'] == resample and model.params['scale_pos_weight'] == 1
    assert evaluate(model, test)['average_precision'] > 0.3


def test_training_needs_frauds():
    train, valid, _ = time_split(synthetic_transactions(2000, seed=1, fraud_rate=0.0))
    with pytest.raises(ValueError, match='no frauds'): train_model(train, valid)
    with pytest.raises(ValueError, match='resample'): train_model(train, valid, resample='magic')
