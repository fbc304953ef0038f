import math

import numpy as np
import pytest

from distill.evaluate import calibration, metrics


def _toy(n: int, seed: int, sharpen: float = 4.0):
    """Logits whose softmax is the true class distribution, multiplied by `sharpen` (overconfident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.0, size=(n, 5))
    p = calibration.softmax(true_logits)
    y = np.array([rng.choice(5, p=row) for row in p])
    return true_logits * sharpen, y


def test_temperature_scaling_fixes_an_overconfident_model():
    val_logits, val_y = _toy(2000, seed=0)
    test_logits, test_y = _toy(2000, seed=1)
    t = calibration.fit_temperature(val_logits, val_y)
    assert t == pytest.approx(4.0, rel=0.15)  # the sharpening factor is recovered
    before = metrics.nll(calibration.softmax(val_logits), val_y)
    after = metrics.nll(calibration.softmax(val_logits, t), val_y)
    assert after < before - 0.1
    raw, scaled = calibration.softmax(test_logits), calibration.softmax(test_logits, t)
    assert (raw.argmax(1) == scaled.argmax(1)).all()  # accuracy untouched
    e_before = metrics.ece(*metrics.top_label(raw, test_y), 15)
    e_after = metrics.ece(*metrics.top_label(scaled, test_y), 15)
    assert e_after < e_before / 2 and e_after < 0.05


def test_underconfident_model_gets_t_below_one_and_no_rows_means_one():
    logits, y = _toy(1500, seed=2, sharpen=0.3)
    assert calibration.fit_temperature(logits, y) < 0.5
    assert calibration.fit_temperature(np.zeros((0, 3)), []) == 1.0
    with pytest.raises(ValueError):
        calibration.fit_temperature(np.zeros((3, 2)), [0, 1])


def test_generative_confidences():
    content = [{"token": "card", "logprob": math.log(0.8)}, {"token": "_lost", "logprob": math.log(0.5)}]
    assert calibration.sequence_confidence(content) == pytest.approx(0.4)
    assert calibration.label_token_confidence(content) == pytest.approx(0.8)
    assert calibration.sequence_confidence(None) is None and calibration.label_token_confidence([]) is None


def test_plots_are_pngs(tmp_path):
    logits, y = _toy(300, seed=4)
    conf, correct = metrics.top_label(calibration.softmax(logits), y)
    path = calibration.reliability_diagram(conf, correct, tmp_path / "r.png", n_bins=10, title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = metrics.confusion(["a", "b", "b"], ["a", "a", "b"], ["a", "b"])
    assert calibration.confusion_plot(cm, ["a", "b"], tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.png"))  # no temporary files left behind


def test_generative_calibration_matches_hand_values_and_sklearn():
    from sklearn.metrics import brier_score_loss

    def lp(*ps):
        return [{"token": "t", "logprob": math.log(p)} for p in ps]

    responses = ["card_lost", "Card_Lost ", "pin_blocked", None, "top_up"]
    golds = ["card_lost", "card_lost", "card_lost", "card_lost", "top_up"]
    logprobs = [lp(0.9, 1.0), lp(0.8, 0.5), lp(0.6), lp(0.5), None]
    seq = calibration.generative_calibration(responses, golds, logprobs, n_bins=2, mode="sequence")
    # confidences .9, .4, .6, .5 with correct 1, 1, 0, 0 (the last row has no logprobs)
    assert seq["n"] == 4 and seq["correct"].tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(seq["confidence"], [0.9, 0.4, 0.6, 0.5])
    assert seq["brier"] == pytest.approx(brier_score_loss([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.5]))
    # bins [0,.5]: .4 (ok), .5 (wrong) -> acc .5, conf .45; (.5,1]: .9 (ok), .6 (wrong) -> acc .5, conf .75
    assert seq["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.25)
    tok = calibration.generative_calibration(responses, golds, logprobs, n_bins=2, mode="label_token")
    np.testing.assert_allclose(tok["confidence"], [0.9, 0.8, 0.6, 0.5])
    with pytest.raises(ValueError):
        calibration.generative_calibration([], [], [], mode="beam")
