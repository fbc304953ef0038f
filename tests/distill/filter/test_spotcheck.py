import csv
import io
from collections import Counter

import pytest

from distill.config import ConfigError
from distill.filter.spotcheck import (
    apply_review,
    export_csv,
    read_decisions,
    review_table,
    sample_for_review,
)

LABELS = ["card_arrival", "lost_or_stolen_card", "top_up_failed", "refund_not_showing_up"]


def rows(n=400):
    out = []
    for i in range(n):
        near = ["entropy"] if i % 25 == 0 else (["grader", "consistency"] if i == 7 else [])
        out.append({"id": f"r{i}", "sample": 0, "label": LABELS[i % 4], "near_threshold": near,
                    "text": f"message {i}, with a comma", "response": LABELS[i % 4]})
    return out


def test_sample_is_stratified_by_label_and_near_threshold():
    data = rows()
    sample = sample_for_review(data, 0.05, seed=3)
    assert 20 <= len(sample) <= 25  # 5 %, plus at most one for each of the 5 near-threshold strata
    assert set(Counter(r["label"] for r in sample)) == set(LABELS)
    assert any(r["id"] == "r7" for r in sample)  # the only row of its near-threshold stratum
    assert sum("entropy" in r["near_threshold"] for r in sample) >= 1
    assert sample == sample_for_review(data, 0.05, seed=3)
    assert [r["id"] for r in sample] != [r["id"] for r in sample_for_review(data, 0.05, seed=4)]
    assert sample_for_review([], 0.1) == [] and sample_for_review(data, 0.0) == []
    assert len(sample_for_review(data[:3], 0.01)) >= 1


def test_export_then_import_decisions_round_trip(tmp_path):
    sample = sample_for_review(rows(), 0.05)
    text = export_csv(sample)
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in table] == [r["id"] for r in sample] and table[0]["text"].endswith("with a comma")
    table[0]["approved"], table[0]["reason"] = "no", "wrong intent"
    table[1]["approved"] = "YES"
    table[2]["reject_pattern"] = r"top_up_\w+"
    path = tmp_path / "decisions.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    decisions, patterns = read_decisions(path)
    assert decisions == {table[0]["id"]: (False, "wrong intent"), table[1]["id"]: (True, "")}
    assert patterns == [r"top_up_\w+"]
    assert review_table(sample)[0]["answer"] == sample[0]["response"]


@pytest.mark.parametrize("content,match", [
    ("id,reason\nr1,x\n", r"decisions\.csv:1: missing column\(s\) approved"),
    ("id,approved\nr1,yes\nr2,maybe\n", r"decisions\.csv:3: approved must be yes/no"),
    ("id,approved,reject_pattern\nr1,yes,(unclosed\n", r"decisions\.csv:2: reject_pattern"),
    ("id,approved\nr1,yes\nr1,no\n", r"decisions\.csv:3: id 'r1' is both approved and rejected"),
    ("id,approved\n,no\n", r"decisions\.csv:2: a decision without an id"),
])
def test_read_decisions_malformed(tmp_path, content, match):
    path = tmp_path / "decisions.csv"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_decisions(path)


def test_read_decisions_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="decisions file not found"):
        read_decisions(tmp_path / "nope.csv")


def test_apply_review_ids_and_patterns():
    data = rows(40)
    kept, rejected = apply_review(data, {"r1": "wrong intent"}, ["^TOP_UP"])
    why = {r["id"]: r["reason"] for r in rejected}
    assert why["r1"] == "reviewer: wrong intent"
    assert all(why[f"r{i}"].startswith("reviewer pattern") for i in range(2, 40, 4))
    assert len(kept) + len(rejected) == 40 and all(r["stage"] == "spotcheck" for r in rejected)
    assert apply_review(data, {}, []) == (data, [])
    with pytest.raises(ConfigError, match="not in the reviewed dataset: r999"):
        apply_review(data, {"r999": ""}, [])
    with pytest.raises(ConfigError, match="not a valid regex"):
        apply_review(data, {}, ["("])
