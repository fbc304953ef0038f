import math

import pytest

from distill.config import (
    ConsistencyConfig,
    EntropyConfig,
    HeuristicsConfig,
    MixConfig,
    TaskConfig,
)
from distill.filter.consistency import consistency
from distill.filter.entropy import entropy_filter
from distill.filter.heuristics import heuristics, unbalanced
from distill.filter.mix import mix_dataset
from distill.filter.rows import build_candidates
from distill.teacher.soft_labels import entropy

LABELS = ["card_arrival", "lost_or_stolen_card", "top_up_failed", "refund_not_showing_up"]
TASK = TaskConfig(name="cards", train_path="train.csv", labels=LABELS, label_field="category",
                  system_prompt="Classify the message.")
GEN = TaskConfig(name="ids", kind="generation", train_path="train.csv", system_prompt="Answer with the id.")


def task_row(i, text=None, gold=None):
    text = text or f"message number {i}"
    return {"id": f"r{i}", "text": text, "gold": gold, "input": {"text": text},
            "messages": [{"role": "user", "content": text}], "_line": i + 2}


def record(i, answer, probs=None, sample=0, status="done", finish="stop", error=None):
    """A teacher record shaped like `distill teacher serve` output (label token + top_logprobs)."""
    logprobs = None
    if probs:
        logprobs = [{"token": answer, "logprob": math.log(probs.get(answer, 1e-9)),
                     "top_logprobs": [{"token": l, "logprob": math.log(p)} for l, p in probs.items()]}]
    return {"id": f"r{i}", "sample": sample, "status": status, "error": error, "response": answer,
            "finish_reason": finish, "truncated": finish == "length", "logprobs": logprobs,
            "usage": {"prompt_tokens": 10, "completion_tokens": 1}, "cost_usd": 0.0, "latency_s": 0.01,
            "attempts": 1, "cached": False, "model": "m", "messages": [], "params": {}}


def cand(i, answer, label=None, ent=0.1, sample=0, text=None, kind="classification", soft=None):
    return {"id": f"r{i}", "sample": sample, "text": text or f"message number {i}", "gold": None,
            "messages": [], "response": answer, "finish_reason": "stop", "truncated": False, "logprobs": None,
            "label": label if label is not None else (answer if kind == "classification" and answer in LABELS else None),
            "soft_labels": soft, "entropy": ent, "weight": 1.0, "near_threshold": []}


def test_build_candidates_joins_records_and_rejects_failures():
    rows = [task_row(i) for i in range(4)]
    recs = [record(0, "card_arrival", {"card_arrival": 0.7, "top_up_failed": 0.2, "lost_or_stolen_card": 0.1}),
            record(1, "top_up_failed"),  # no logprobs: smoothed one-hot
            record(2, None, status="failed", error="http 500 after 6 retries"),
            record(3, '{"label": "Lost_or_stolen_card", "rationale": "stolen"}'),
            record(9, "card_arrival")]
    kept, rejected = build_candidates(rows, recs, TASK)
    assert [r["id"] for r in kept] == ["r0", "r1", "r3"]
    c0 = kept[0]
    assert c0["label"] == "card_arrival" and c0["text"] == "message number 0"
    assert sum(c0["soft_labels"].values()) == pytest.approx(1.0)
    assert c0["soft_labels"]["card_arrival"] == pytest.approx(0.7, abs=1e-3)
    assert c0["entropy"] == pytest.approx(entropy(c0["soft_labels"]))
    assert kept[1]["soft_labels"]["top_up_failed"] == pytest.approx(0.95)
    assert kept[2]["label"] == "lost_or_stolen_card"  # label read from a structured answer
    reasons = {r["id"]: (r["stage"], r["reason"]) for r in rejected}
    assert reasons["r2"] == ("generation", "teacher failed: http 500 after 6 retries")
    assert reasons["r9"][1].startswith("unknown id")


def test_build_candidates_generation_uses_token_entropy():
    rows = [task_row(0)]
    lp = [{"token": "a", "logprob": math.log(0.5), "top_logprobs": [{"token": "a", "logprob": math.log(0.5)},
                                                                     {"token": "b", "logprob": math.log(0.5)}]}]
    rec = record(0, "a") | {"logprobs": lp}
    kept, _ = build_candidates(rows, [rec], GEN)
    assert kept[0]["label"] is None and kept[0]["soft_labels"] is None
    assert kept[0]["entropy"] == pytest.approx(math.log(2))


@pytest.mark.parametrize("text,expected", [
    ('{"a": [1, 2], "b": "x"}', False),
    ('{"a": "unclosed ( bracket inside a string"}', False),
    ("plain prose, it's fine (really).", False),
    ('{"a": [1, 2', True),
    ('{"a": "cut off mid str', True),
    ("```json\n{\"a\": 1}", True),
    ("(a]", True),
])
def test_unbalanced(text, expected):
    assert unbalanced(text) is expected


def test_heuristics_classification_clean_noisy_malformed():
    rows = [cand(0, "card_arrival"), cand(1, "  top_up_failed \n"), cand(2, ""), cand(3, "   "), cand(4, None),
            cand(5, "card_arr") | {"finish_reason": "length", "truncated": True},
            cand(6, "I'm sorry, I can't help with that."), cand(7, "Lo siento, no puedo ayudar"),
            cand(8, "weather_forecast"), cand(9, 12345)]
    rows[1]["label"] = "top_up_failed"
    kept, rejected = heuristics(rows, HeuristicsConfig(), TASK)
    assert [r["id"] for r in kept] == ["r0", "r1"]
    codes = {r["id"]: r["reason"].split(":")[0] for r in rejected}
    assert codes == {"r2": "empty", "r3": "empty", "r4": "empty", "r5": "truncated", "r6": "refusal",
                     "r7": "refusal", "r8": "format", "r9": "empty"}
    assert all(r["stage"] == "heuristics" for r in rejected)


def test_heuristics_generation_schema_regex_and_length():
    schema = {"type": "object", "required": ["amount", "currency"],
              "properties": {"amount": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}}}
    cfg = HeuristicsConfig(json_schema=schema, max_chars=60)
    rows = [cand(0, '{"amount": 12.5, "currency": "EUR"}', kind="generation"),
            cand(1, '```json\n{"amount": 3, "currency": "USD"}\n```', kind="generation"),
            cand(2, '{"amount": "12", "currency": "EUR"}', kind="generation"),
            cand(3, '{"amount": 1, "currency": "GBP"}', kind="generation"),
            cand(4, "amount: 12 EUR", kind="generation"),
            cand(5, '{"amount": 1, "currency": "EUR"', kind="generation"),
            cand(6, '{"amount": 1, "currency": "EUR", "note": "' + "x" * 80 + '"}', kind="generation")]
    kept, rejected = heuristics(rows, cfg, GEN)
    assert [r["id"] for r in kept] == ["r0", "r1"]
    why = {r["id"]: r["reason"] for r in rejected}
    assert why["r2"].startswith("format: schema violation at amount")
    assert why["r3"].startswith("format: schema violation at currency")
    assert why["r4"].startswith("format: not JSON")
    assert why["r5"].startswith("truncated: unbalanced")
    assert why["r6"].startswith("length:")
    kept, rejected = heuristics([cand(0, "ID-1234", kind="generation"), cand(1, "id 12", kind="generation")],
                                HeuristicsConfig(answer_regex=r"ID-\d{4}"), GEN)
    assert [r["id"] for r in kept] == ["r0"] and rejected[0]["reason"].startswith("format: does not match")


def test_heuristics_config_rejects_bad_patterns():
    with pytest.raises(ValueError, match="not a valid regex"):
        HeuristicsConfig(refusal_patterns=["(unclosed"])
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        HeuristicsConfig(json_schema={"type": "no-such-type"})


def test_consistency_rationale_contradiction():
    cfg = ConsistencyConfig(rationale_field="rationale")
    rows = [cand(0, '{"label": "card_arrival", "rationale": "The customer asks when the card arrives: card arrival."}',
                 label="card_arrival"),
            cand(1, '{"label": "card_arrival", "rationale": "This is a lost or stolen card report."}',
                 label="card_arrival"),
            cand(2, '{"label": "top_up_failed", "rationale": "Not refund_not_showing_up but top-up-failed."}',
                 label="top_up_failed"),
            cand(3, "not json at all", label="card_arrival"),
            cand(4, '{"label": "card_arrival"}', label="card_arrival")]
    kept, rejected = consistency(rows, cfg, TASK)
    assert [r["id"] for r in kept] == ["r0", "r2", "r3", "r4"]
    assert rejected[0]["id"] == "r1" and "lost_or_stolen_card" in rejected[0]["reason"]
    assert rejected[0]["reason"].startswith("contradiction:")


def _dist(label, p=0.8):
    rest = (1 - p) / (len(LABELS) - 1)
    return {l: (p if l == label else rest) for l in LABELS}


def test_consistency_across_samples_majority_merge_and_drop():
    agree = [cand(0, "card_arrival", sample=0, soft=_dist("card_arrival")),
             cand(0, "top_up_failed", sample=1, soft=_dist("top_up_failed")),
             cand(0, "card_arrival", sample=2, soft=_dist("card_arrival", 0.6))]
    split = [cand(1, LABELS[s % 4], sample=s, soft=_dist(LABELS[s % 4])) for s in range(5)]
    single = [cand(2, "card_arrival")]
    kept, rejected = consistency(agree + split + single, ConsistencyConfig(min_agreement=0.6), TASK)
    assert [(r["id"], r["sample"]) for r in kept] == [("r0", 0), ("r2", 0)]
    rep = kept[0]
    assert rep["agreement"] == pytest.approx(2 / 3) and "consistency" in rep["near_threshold"]
    expected = (0.8 + 0.0667 + 0.6) / 3
    assert rep["soft_labels"]["card_arrival"] == pytest.approx(expected, abs=1e-3)
    assert sum(rep["soft_labels"].values()) == pytest.approx(1.0)
    why = {(r["id"], r["sample"]): r["reason"].split(":")[0] for r in rejected}
    assert why == {("r0", 1): "disagreement", ("r0", 2): "merged", **{("r1", s): "disagreement" for s in range(5)}}

    kept, rejected = consistency(split, ConsistencyConfig(min_agreement=0.6, on_disagreement="downweight"), TASK)
    assert len(kept) == 1 and kept[0]["weight"] == pytest.approx(0.4) and len(rejected) == 4


def test_consistency_generation_compares_normalised_text():
    rows = [cand(0, "The Amount is 12 EUR", sample=0, kind="generation"),
            cand(0, "the amount   is 12 eur", sample=1, kind="generation"),
            cand(0, "12 USD", sample=2, kind="generation")]
    kept, rejected = consistency(rows, ConsistencyConfig(), GEN)
    assert len(kept) == 1 and kept[0]["agreement"] == pytest.approx(2 / 3)
    assert sorted(r["reason"].split(":")[0] for r in rejected) == ["disagreement", "merged"]


def test_entropy_percentile_absolute_and_missing():
    rows = [cand(i, "card_arrival", ent=i / 100) for i in range(100)] + [cand(100, "card_arrival", ent=None)]
    kept, rejected = entropy_filter(rows, EntropyConfig(drop_percentile=5.0), TASK)
    assert sorted(r["id"] for r in rejected) == [f"r{i}" for i in range(95, 100)]
    assert "r100" in {r["id"] for r in kept}
    near = [r["id"] for r in kept if "entropy" in r["near_threshold"]]
    assert near == [f"r{i}" for i in range(90, 95)]
    kept, rejected = entropy_filter(rows, EntropyConfig(max_entropy=0.5), TASK)
    assert len(rejected) == 49 and rejected[0]["reason"].startswith("entropy: 0.510 nats > 0.500")
    same = [cand(i, "card_arrival", ent=0.3) for i in range(20)]
    assert len(entropy_filter(same, EntropyConfig(drop_percentile=10), TASK)[0]) == 20
    assert entropy_filter([], EntropyConfig(), TASK) == ([], [])


def test_mix_dataset_share_tail_and_stratified_split():
    kept = []
    for i in range(400):
        label = LABELS[i % 3] if i % 40 else LABELS[3]  # LABELS[3] is rare: 10 of 400
        kept.append(cand(i, label, ent=(i % 50) / 50, soft=_dist(label)))
    real = [task_row(1000 + i, gold=LABELS[i % 4]) for i in range(500)] + [task_row(2000, gold=None)]
    cfg = MixConfig(real_fraction=0.3, validation_fraction=0.2, tail_oversample=3.0)
    out = mix_dataset(kept, real, LABELS, cfg, seed=1)
    assert out == mix_dataset(kept, real, LABELS, cfg, seed=1)
    assert set(out[0]) == {"id", "text", "messages", "target", "soft_labels", "source", "weight", "split"}
    real_out = [r for r in out if r["source"] == "real"]
    assert len(real_out) / len(out) == pytest.approx(0.3, abs=0.005)
    assert all(r["soft_labels"] is None for r in real_out)
    for label in LABELS:
        rows = [r for r in out if r["target"] == label]
        assert sum(r["split"] == "validation" for r in rows) == round(len(rows) * 0.2)
    rare = [r for r in out if r["target"] == LABELS[3] and r["source"] == "teacher"]
    assert all(r["weight"] == 3.0 for r in rare)
    assert 0 < sum(r["weight"] > 1 for r in out) < len(out) / 2
    only_teacher = mix_dataset(kept, real[:10], LABELS, cfg)
    assert sum(r["source"] == "real" for r in only_teacher) == 10  # all there is; teacher rows kept
    assert mix_dataset(kept, real, LABELS, MixConfig(real_fraction=0.0)) and \
        all(r["source"] == "teacher" for r in mix_dataset(kept, real, LABELS, MixConfig(real_fraction=0.0)))


def test_entropy_absolute_and_percentile_together_drop_above_either():
    rows = [cand(i, "card_arrival", ent=i / 100) for i in range(100)]
    # The 90th percentile (0.891) is below the absolute 0.95: the percentile decides.
    kept, rejected = entropy_filter(rows, EntropyConfig(max_entropy=0.95, drop_percentile=10.0), TASK)
    assert sorted(r["id"] for r in rejected) == [f"r{i}" for i in range(90, 100)]
    # Absolute 0.3 nats is below the percentile: every row above 0.3 goes, whatever their share.
    kept, rejected = entropy_filter(rows, EntropyConfig(max_entropy=0.3, drop_percentile=10.0), TASK)
    assert len(rejected) == 69 and all(r["entropy"] > 0.3 for r in rejected)
