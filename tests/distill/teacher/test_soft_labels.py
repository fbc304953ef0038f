"""Label distributions recovered from multi-token answers, against the stand-in chat model's exact logprobs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from distill.teacher.soft_labels import entropy, soft_labels, trie_mass

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])
SHAPES = {
    "json": (('{"label": "', '"}'), lambda l: l),
    "verbatim": (("", ""), lambda l: l),
    "free text": (("", "."), standin.humanised),
    "prefixed": (("Intent: ", ""), lambda l: l),
}


def tok(token: str, p: float, alts: dict[str, float]) -> dict:
    return {"token": token, "logprob": math.log(p),
            "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in alts.items()]}


def test_a_sure_teacher_of_a_multi_token_label_gets_its_probability_not_a_share_of_its_prefix():
    # 97 % card_arrival, spelled card|_arr|ival; the first token "card" starts a dozen labels.
    content = [tok("card", 0.98, {"card": 0.98, "lost": 0.02}),
               tok("_arr", 0.97 / 0.98, {"_arr": 0.97 / 0.98, "_link": 0.01 / 0.98}),
               tok("ival", 1.0, {"ival": 1.0})]
    dist = soft_labels({"response": "card_arrival", "logprobs": content}, LABELS)
    assert dist["card_arrival"] == pytest.approx(0.97, abs=1e-3)
    assert dist["card_linking"] == pytest.approx(0.01, abs=1e-3)
    # "lost" continues only lost_or_stolen_card and lost_or_stolen_phone: 0.02 shared by those two.
    assert dist["lost_or_stolen_card"] == pytest.approx(0.01, abs=1e-3)
    assert dist["lost_or_stolen_phone"] == pytest.approx(0.01, abs=1e-3)
    assert dist["card_about_to_expire"] < 1e-3  # no longer tied with card_arrival


def test_the_branching_mass_is_read_inside_a_json_answer():
    content = [tok('{"label": "', 1.0, {'{"label": "': 1.0}), tok("card", 0.9, {"card": 0.9, "cash": 0.1}),
               tok("_arr", 1.0, {"_arr": 1.0}), tok("ival", 1.0, {"ival": 1.0}), tok('"}', 1.0, {'"}': 1.0})]
    dist = soft_labels({"response": '{"label": "card_arrival"}', "logprobs": content}, LABELS)
    assert dist["card_arrival"] == pytest.approx(0.9, abs=1e-3)
    assert dist["cash_withdrawal_charge"] == pytest.approx(dist["cash_withdrawal_not_recognised"], rel=1e-6)
    assert dist["cash_withdrawal_charge"] > 0.01


def test_whole_label_tokens_of_a_classifier_teacher_go_to_that_label_alone():
    labels = ["top_up", "top_up_failed", "refund"]
    content = [tok("top_up_failed", 0.7, {"top_up_failed": 0.7, "top_up": 0.2, "refund": 0.1})]
    dist = soft_labels({"response": "top_up_failed", "logprobs": content}, labels)
    assert dist == pytest.approx({"top_up_failed": 0.7, "top_up": 0.2, "refund": 0.1}, abs=1e-4)


def test_tokens_that_do_not_spell_the_answer_fall_back_to_label_smoothing():
    content = [tok("something", 0.5, {"something": 0.5})]
    assert trie_mass(content, LABELS, "card_arrival") is None
    dist = soft_labels({"response": "card_arrival", "logprobs": content}, LABELS)
    assert dist["card_arrival"] == pytest.approx(0.95)
    assert soft_labels({"response": "no idea", "logprobs": None}, LABELS) is None


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("top", [5, 20])
def test_trie_recovery_on_banking77_argmax_is_the_teachers_answer(shape, top, capsys):
    frame, surface = SHAPES[shape]
    texts = list(GOLDS)[::15]
    tv, first_token_ties = [], 0
    for text in texts:
        truth = standin.true_distribution(text, GOLDS[text], LABELS)
        answer = max(truth, key=truth.get)
        content = standin.logprob_content(frame, surface, answer, truth, top)
        assert len([c for c in content if c["logprob"] < 0]) >= 1
        reply = "".join(c["token"] for c in content)
        dist = soft_labels({"response": reply, "logprobs": content}, LABELS)
        assert max(dist, key=dist.get) == answer, reply
        assert sum(dist.values()) == pytest.approx(1.0)
        assert dist[answer] == pytest.approx(truth[answer], rel=0.05)  # the product of its tokens' probabilities
        tv.append(0.5 * sum(abs(dist[l] - truth[l]) for l in LABELS))
        first_token_ties += dist[answer] < 0.5 * truth[answer]
    mean_tv = sum(tv) / len(tv)
    with capsys.disabled():
        print(f"\n{shape} top_logprobs={top}: rows={len(texts)} mean_tv={mean_tv:.4f}")
    assert first_token_ties == 0
    assert mean_tv < 0.12


def test_entropy_tracks_the_teachers_uncertainty_not_the_labels_first_token():
    text = next(t for t in GOLDS if GOLDS[t].startswith("card_"))
    truth = standin.true_distribution(text, GOLDS[text], LABELS)
    answer = max(truth, key=truth.get)
    content = standin.logprob_content(('{"label": "', '"}'), lambda l: l, answer, truth, 20)
    dist = soft_labels({"response": "".join(c["token"] for c in content), "logprobs": content}, LABELS)
    assert entropy(dist) == pytest.approx(entropy(truth), abs=0.35)
