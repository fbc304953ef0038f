"""Self-contradiction: within one answer and across samples of one prompt.

Semantics (`consistency`), applied in this order:

1. Within one answer: when the answer is a JSON object and
   `config.rationale_field` is set, the rationale is searched for label names
   (whole words, case-insensitive, "_" / "-" / " " interchangeable). If it names
   at least one label and does not name the answer's own label, the row is a
   contradiction. A rationale that names its own label and others ("not X but
   Y") is accepted.
2. Across samples of one prompt (rows sharing an id, samples_per_prompt > 1):
   each sample's answer is its label (classification) or its whitespace- and
   case-normalised text (generation). The majority answer's share of the
   samples still present is the agreement. The first majority sample is the
   representative; for classification its soft labels become the mean of all
   samples' distributions (the samples' own uncertainty is a better KD target
   than one sample's). Minority samples are rejected ("disagreement") and the
   other majority samples are folded into the representative ("merged").
   If agreement < `min_agreement`: with on_disagreement="drop" every sample is
   rejected; with "downweight" the representative is kept with weight =
   agreement. A prompt with one sample passes unchanged.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from distill.config import (
    ConsistencyConfig,
    TaskConfig,
)
from distill.filter.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.filter.rows import Rows, near_row, parse_json_answer, reject_row
from distill.teacher.soft_labels import entropy as dist_entropy
from distill.teacher.soft_labels import label_of


def _label_regex(label: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in re.split(r"[\s_\-]+", label.strip()) if p]
    return re.compile(r"(?<![\w])" + r"[\s_\-]+".join(parts) + r"(?![\w])", re.I)


def _answer_key(row: dict[str, Any], task: TaskConfig) -> str:
    if task.kind == "classification":
        return row.get("label") or ""
    return " ".join((row.get("response") or "").lower().split())


def consistency(rows: Rows, config: ConsistencyConfig, task: TaskConfig) -> tuple[Rows, Rows]:
    """Drop self-contradicting answers and disagreeing samples (exact semantics in the module doc).

    Args:
        rows: candidate rows (several per id when the teacher was sampled more than once).
        config: consistency section (rationale_field, label_key, min_agreement, on_disagreement).
        task: the task (label set; classification compares labels, generation normalised text).
    """
    labels = task.label_set() if task.kind == "classification" else []
    patterns = {l: _label_regex(l) for l in labels} if config.rationale_field else {}
    rejected: Rows = []
    survivors: Rows = []
    for row in rows:
        reason = None
        if patterns:
            try:
                obj = parse_json_answer(row.get("response"))
            except ValueError:
                obj = None
            rationale = obj.get(config.rationale_field) if isinstance(obj, dict) else None
            own = row.get("label") or (obj.get(config.label_key) if isinstance(obj, dict) else None)
            if isinstance(rationale, str) and isinstance(own, str):
                named = [l for l, p in patterns.items() if p.search(rationale)]
                if named and label_of(own, labels) not in named:
                    reason = f"contradiction: label {own!r} but the rationale names {', '.join(named[:3])}"
        if reason:
            rejected.append(reject_row(row, "consistency", reason))
        else:
            survivors.append(row)

    groups: dict[Any, Rows] = defaultdict(list)
    for row in survivors:
        groups[row["id"]].append(row)
    kept: Rows = []
    for rid, group in groups.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        keys = [_answer_key(r, task) for r in group]
        counts = Counter(keys)
        majority = max(counts, key=lambda k: (counts[k], -keys.index(k)))  # ties: first seen wins
        agreement = counts[majority] / len(group)
        rep_i = keys.index(majority)
        rep = {**group[rep_i], "agreement": agreement}
        dists = [r.get("soft_labels") for r in group]
        if labels and all(dists):
            mean = {l: sum(d[l] for d in dists) / len(dists) for l in labels}
            rep["soft_labels"] = mean
            rep["entropy"] = dist_entropy(mean)
        if agreement < 1:
            rep = near_row(rep, "consistency")
        below = agreement < config.min_agreement
        if below and config.on_disagreement == "drop":
            for r in group:
                rejected.append(reject_row(r, "consistency", f"disagreement: agreement {agreement:.2f} < "
                                        f"min_agreement {config.min_agreement:.2f} across {len(group)} samples"))
            continue
        if below:
            rep["weight"] = float(rep.get("weight", 1.0)) * agreement
        kept.append(rep)
        for i, (r, k) in enumerate(zip(group, keys)):
            if i == rep_i:
                continue
            if k == majority:
                rejected.append(reject_row(r, "consistency", f"merged: same answer as sample {rep['sample']}"))
            else:
                rejected.append(reject_row(r, "consistency", f"disagreement: minority answer {k[:40]!r} "
                                        f"(majority {majority[:40]!r}, agreement {agreement:.2f})"))
    return kept, rejected
