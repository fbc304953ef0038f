import math

import numpy as np
import pytest

from distill.evaluate import metrics


def test_ece_mce_by_hand():
    conf = [0.9, 0.8, 0.6, 0.55, 0.3]
    correct = [1, 0, 1, 1, 0]
    # 2 bins: [0, .5] holds 0.3 (acc 0, gap .3, weight 1/5);
    # (.5, 1] holds the rest (acc 3/4, mean conf 2.85/4 = .7125, gap .0375, weight 4/5).
    assert metrics.ece(conf, correct, n_bins=2) == pytest.approx(0.2 * 0.3 + 0.8 * 0.0375)
    assert metrics.mce(conf, correct, n_bins=2) == pytest.approx(0.3)
    # Perfectly calibrated in every bin -> zero.
    assert metrics.ece([0.75] * 4, [1, 1, 1, 0], n_bins=10) == pytest.approx(0.0)
    assert math.isnan(metrics.ece([], [], 5))


def test_edge_values_fall_in_the_lower_bin():
    b = metrics.reliability_bins([0.5, 0.5000001, 0.0, 1.0], [1, 0, 0, 1], n_bins=2)
    assert b["count"].tolist() == [2, 2]
    assert b["accuracy"].tolist() == [0.5, 0.5]


def test_bins_match_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    conf = np.round(rng.uniform(0, 1, 400), 2)  # rounding puts many values exactly on bin edges
    correct = (rng.uniform(0, 1, 400) < conf).astype(float)
    for n_bins in (5, 10, 15):
        b = metrics.reliability_bins(conf, correct, n_bins)
        prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
        filled = b["count"] > 0
        np.testing.assert_allclose(b["accuracy"][filled], prob_true)
        np.testing.assert_allclose(b["confidence"][filled], prob_pred)
        # ECE is the support-weighted mean of exactly those per-bin gaps.
        weights = b["count"][filled] / len(conf)
        assert metrics.ece(conf, correct, n_bins) == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))


def test_brier_by_hand_and_against_sklearn():
    from sklearn.metrics import brier_score_loss

    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    y = [0, 2]
    # row 1: .3^2 + .2^2 + .1^2 = .14; row 2: .2^2 + .5^2 + .7^2 = .78
    assert metrics.brier(probs, y) == pytest.approx(0.46)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=50)
    yy = rng.integers(0, 4, size=50)
    assert metrics.brier(p, yy) == pytest.approx(brier_score_loss(yy, p, labels=[0, 1, 2, 3], scale_by_half=False))


def test_accuracy_agreement_per_label_confusion():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "b"]
    assert metrics.accuracy(gold, pred) == 0.5
    assert metrics.agreement(pred, ["a", "b", None, "b"]) == 0.75
    scores = metrics.per_label_scores(gold, pred, ["a", "b", "c"])
    assert scores["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores["b"]["precision"] == pytest.approx(1 / 3) and scores["b"]["recall"] == 1.0
    assert scores["c"]["f1"] == 0.0
    assert metrics.macro_f1(scores) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert metrics.confusion(gold, pred, ["a", "b", "c"]).tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], ["a", "b"])


def test_entropies_and_nll():
    uniform = np.full((3, 4), 0.25)
    assert metrics.mean_entropy(uniform) == pytest.approx(math.log(4))
    assert metrics.mean_entropy(np.eye(3)) == pytest.approx(0.0)
    assert metrics.label_entropy(["a", "a", "b", "b"]) == pytest.approx(math.log(2))
    assert metrics.label_entropy(["a"] * 5) == pytest.approx(0.0)
    assert metrics.nll(np.array([[0.5, 0.5], [0.9, 0.1]]), [0, 0]) == pytest.approx(-(math.log(0.5) + math.log(0.9)) / 2)


def test_percentiles():
    p = metrics.percentiles(list(range(1, 101)))
    assert p["p50"] == pytest.approx(50.5) and p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)
    assert math.isnan(metrics.percentiles([])["p95"])
