"""The cost-minimising threshold and the evaluation metrics (no services needed).

Loading, validation, the time split, features and training are tested in their chapters (nbs/01_data,
nbs/04_model); these evaluation tests belong to nbs/05_evaluation and move there with it."""
import numpy as np
import pandas as pd
import pytest

from fraud_nb.evaluation import choose_threshold, expected_cost, evaluate, cost_curve, bootstrap_ci


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
