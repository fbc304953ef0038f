"""The final dataset: teacher rows mixed with real examples, tails oversampled, split stratified.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

from distill.config import (
    MixConfig,
)
from distill.filter.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.filter.rows import Rows


def _tail_reasons(rows: Rows, labels: list[str] | None, config: MixConfig) -> list[set[str]]:
    counts = Counter(r["target"] for r in rows if labels)
    mean = (sum(counts.values()) / len(counts)) if counts else 0.0
    lengths = sorted(len(r["text"] or "") for r in rows)
    entropies = sorted(r["_entropy"] for r in rows if r["_entropy"] is not None)
    k = int(len(lengths) * config.tail_quantile)
    long_cut = lengths[-k] if k else math.inf
    ke = int(len(entropies) * config.tail_quantile)
    unsure_cut = entropies[-ke] if ke else math.inf
    out = []
    for r in rows:
        why = set()
        if labels and counts[r["target"]] < config.rare_label_share * mean:
            why.add("rare_label")
        if len(r["text"] or "") >= long_cut:
            why.add("long_input")
        if r["_entropy"] is not None and r["_entropy"] >= unsure_cut and r["_entropy"] > 0:
            why.add("low_confidence")
        if r["source"] != "real" and (r.get("_agreement") or 1.0) < 1.0:
            why.add("low_confidence")
        out.append(why)
    return out


def mix_dataset(kept: Rows, real_rows: Rows, labels: list[str] | None, config: MixConfig,
                seed: int = 0) -> Rows:
    """The training set: teacher rows plus a share of real (gold) rows, tail-weighted and split.

    Args:
        kept: candidate rows that passed every stage (target = label, or the answer for generation).
        real_rows: task rows with gold answers reserved for the real share; rows without gold are skipped.
        labels: the label set (classification) or None (generation).
        config: mix section. Real rows are sampled so they make up `real_fraction` of the result;
            with fewer real rows available, all are used and the share is lower (teacher rows are
            never thrown away to reach it). Tail rows (rare labels, the longest inputs, the least
            confident teacher rows) get their weight multiplied by `tail_oversample`.
        seed: seed for sampling, the split and the output order.

    Returns training rows: {"id","text","messages","target","soft_labels","source","weight","split"}; source
    is "teacher" (a training input the teacher labelled), "traffic" (recent production traffic the teacher
    labelled, kept with that provenance) or "real" (gold).
    The validation split is stratified by target label (classification) or by source (generation).
    """
    rng = random.Random(seed)
    rows: Rows = []
    teacher_ids = set()
    for r in kept:
        target = r.get("label") if labels else r.get("response")
        if target is None:
            continue
        teacher_ids.add(r["id"])
        rows.append({"id": r["id"], "text": r.get("text"), "messages": r.get("messages"), "target": target,
                     "soft_labels": r.get("soft_labels"), "source": r.get("source") or "teacher",
                     "weight": float(r.get("weight", 1.0)), "_entropy": r.get("entropy"),
                     "_agreement": r.get("agreement")})
    pool = [r for r in real_rows if r.get("gold") is not None and r["id"] not in teacher_ids]
    if config.real_fraction >= 1:
        rows, want = [], len(pool)
    else:
        want = round(len(rows) * config.real_fraction / (1 - config.real_fraction))
    chosen = rng.sample(pool, min(want, len(pool)))
    for r in chosen:
        rows.append({"id": r["id"], "text": r.get("text"), "messages": r.get("messages"), "target": r["gold"],
                     "soft_labels": None, "source": "real", "weight": 1.0, "_entropy": None, "_agreement": None})
    for r, why in zip(rows, _tail_reasons(rows, labels, config)):
        if why:
            r["weight"] *= config.tail_oversample
    strata: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        strata[str(r["target"]) if labels else r["source"]].append(i)
    split = ["train"] * len(rows)
    for key in sorted(strata):
        idx = strata[key]
        rng.shuffle(idx)
        n_val = round(len(idx) * config.validation_fraction) if len(idx) > 1 else 0
        for i in idx[:n_val]:
            split[i] = "validation"
    out = [{k: v for k, v in r.items() if not k.startswith("_")} | {"split": s} for r, s in zip(rows, split)]
    rng.shuffle(out)
    return out
