import numpy as np
import pytest

from distill.config import ConfigError
from distill.evaluate import robustness

TEXT = "My card was declined at the shop, can you help me please?"


def test_rephrasings_are_deterministic_and_change_the_text():
    for kind in robustness.KINDS:
        a = robustness.rephrase(TEXT, kind, "row-1")
        assert a == robustness.rephrase(TEXT, kind, "row-1")
        assert a != TEXT, kind
    # Seeded by the row id: some other id gives another typo somewhere.
    variants = {robustness.rephrase(TEXT, "typos", f"row-{i}") for i in range(20)}
    assert len(variants) > 5
    assert robustness.rephrase(TEXT, "punctuation", "x").replace("?", "").replace("!", "").replace(".", "") \
        .replace(",", "").strip() != ""
    with pytest.raises(ValueError, match="unknown rephrasing"):
        robustness.rephrase(TEXT, "shouting", "x")


def test_short_and_odd_inputs_do_not_break():
    for text in ["", "ok", "a b", "!!!", "PIN"]:
        for kind in robustness.KINDS:
            assert isinstance(robustness.rephrase(text, kind, "id"), str)


def test_rephrased_rows_and_subset():
    rows = [{"id": f"r{i}", "text": f"text number {i} about my card", "gold": "x"} for i in range(50)]
    subset = robustness.pick_rows(rows, 10)
    assert len(subset) == 10 and subset == robustness.pick_rows(list(reversed(rows)), 10)
    out = robustness.rephrased_rows(subset)
    assert len(out) == 10 * len(robustness.KINDS)
    assert {o["kind"] for o in out} == set(robustness.KINDS)
    assert all(o["gold"] == "x" and o["source_id"] in {r["id"] for r in subset} for o in out)


def test_ood_set_and_abstention(tmp_path):
    texts = robustness.load_ood()
    assert 90 <= len(texts) <= 150 and len(set(texts)) == len(texts)
    assert not any("card" in t.lower() or "bank" in t.lower() for t in texts)
    f = tmp_path / "ood.txt"
    f.write_text("# comment\n\nhello\n")
    assert robustness.load_ood(f) == ["hello"]
    f.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="ood.txt"):
        robustness.load_ood(f)
    with pytest.raises(ConfigError, match="not found"):
        robustness.load_ood(tmp_path / "missing.txt")
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.3, 0.7]])
    assert robustness.abstain_rate(probs, 0.6) == pytest.approx(1 / 3)
