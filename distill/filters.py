"""The filter stages and the final mix: pure functions over candidate rows.

Every stage has the shape `(rows, config, task) -> (kept, rejected)`; a rejected
row is the row plus {"stage", "reason"}, where the reason starts with a short
code ("empty", "truncated", "refusal", "format", "length", "contradiction",
"disagreement", "merged", "entropy", ...) followed by ": " and the detail, so
reports can group by code and still show the specifics. Nothing is discarded:
rejected rows are kept for audit and override.

Kept rows may gain `near_threshold` (stages the row passed only narrowly; the
spot-check stratifies on it), `weight` (< 1 when down-weighted) and `agreement`.

Self-contradiction semantics (`consistency`), applied in this order:

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

import json
import math
import random
import re
from collections import Counter, defaultdict
from typing import Any

from distill.config import (ConsistencyConfig, EntropyConfig, HeuristicsConfig, MixConfig, TaskConfig)
from distill.dedup import dedup  # noqa: F401  (the dedup stage lives with its algorithms)
from distill.soft_labels import entropy as dist_entropy
from distill.soft_labels import label_of, soft_labels, token_entropy

Rows = list[dict[str, Any]]


def _reject(row: dict[str, Any], stage: str, reason: str) -> dict[str, Any]:
    return {**row, "stage": stage, "reason": reason}


def _near(row: dict[str, Any], stage: str) -> dict[str, Any]:
    return {**row, "near_threshold": [*(row.get("near_threshold") or []), stage]}


def parse_json_answer(text: str | None) -> Any:
    """The JSON value of an answer, tolerating a surrounding ``` fence; raises ValueError if not JSON."""
    if text is None:
        raise ValueError("no answer")
    s = text.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*(.*?)\s*```", s, re.S)
    if fence:
        s = fence.group(1)
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at char {e.pos})") from None


def _structured_label(text: str | None, labels: list[str], label_key: str) -> str | None:
    if not text or not text.lstrip().startswith(("{", "`")):
        return None
    try:
        obj = parse_json_answer(text)
    except ValueError:
        return None
    value = obj.get(label_key) if isinstance(obj, dict) else None
    return label_of(value, labels) if isinstance(value, str) else None


def build_candidates(task_rows: Rows, records: Rows, task: TaskConfig,
                     label_key: str = "label") -> tuple[Rows, Rows]:
    """Join teacher records to task rows by id.

    Args:
        task_rows: task rows (see distill/data.py).
        records: teacher records, any number of samples per id.
        task: the task section (kind and label set).
        label_key: JSON field read as the label when a classification answer is a JSON object.

    Returns (candidates, rejected): failed records and records whose id is not a task row come back
    rejected with stage "generation". A candidate's entropy is that of its label distribution
    (classification) or its mean token entropy (generation); None when it cannot be known.
    """
    by_id = {r["id"]: r for r in task_rows}
    labels = task.label_set() if task.kind == "classification" else []
    kept, rejected = [], []
    for rec in records:
        row = by_id.get(rec.get("id"))
        base = {
            "id": rec.get("id"), "sample": rec.get("sample", 0),
            "text": row["text"] if row else None, "gold": row["gold"] if row else None,
            "messages": row["messages"] if row else rec.get("messages"),
            "response": rec.get("response"), "finish_reason": rec.get("finish_reason"),
            "truncated": bool(rec.get("truncated")), "logprobs": rec.get("logprobs"),
            "label": None, "soft_labels": None, "entropy": None, "weight": 1.0, "near_threshold": [],
        }
        if row is None:
            rejected.append(_reject(base, "generation", f"unknown id: {rec.get('id')!r} is not a task row"))
            continue
        if rec.get("status") != "done":
            rejected.append(_reject(base, "generation", f"teacher failed: {rec.get('error') or 'no reason given'}"))
            continue
        if task.kind == "classification":
            label = label_of(rec.get("response"), labels) or _structured_label(rec.get("response"), labels, label_key)
            base["label"] = label
            dist = soft_labels({**rec, "response": label or rec.get("response")}, labels)
            base["soft_labels"] = dist
            base["entropy"] = dist_entropy(dist) if dist else None
        else:
            base["entropy"] = token_entropy(rec)
        kept.append(base)
    return kept, rejected


# --- 1. heuristics -------------------------------------------------------------------------------

_OPEN = {"(": ")", "[": "]", "{": "}"}


def unbalanced(text: str) -> bool:
    """True when brackets don't close in order, a double-quoted string is left open, or a ``` fence
    is unclosed: the usual look of an answer cut off mid-structure. Apostrophes are ignored (prose)."""
    if text.count("```") % 2:
        return True
    stack: list[str] = []
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                return True
    return in_str or bool(stack)


def heuristics(rows: Rows, config: HeuristicsConfig, task: TaskConfig) -> tuple[Rows, Rows]:
    """Drop empty, truncated, refused, malformed and out-of-bounds answers (first failing check wins).

    Args:
        rows: candidate rows.
        config: heuristics section (refusal patterns, length bounds, answer_regex / json_schema).
        task: the task (classification answers must name a label of the label set).
    """
    refusals = [re.compile(p, re.I) for p in config.refusal_patterns]
    pattern = re.compile(config.answer_regex, re.S) if config.answer_regex else None
    validator = None
    if config.json_schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(config.json_schema)(config.json_schema)
    kept, rejected = [], []
    for row in rows:
        answer = row.get("response")
        reason = None
        if not isinstance(answer, str) or not answer.strip():
            reason = "empty: blank answer" if isinstance(answer, str) else "empty: no answer"
        elif row.get("truncated") or row.get("finish_reason") == "length":
            reason = "truncated: finish_reason=length"
        elif task.kind == "generation" and config.check_balance and unbalanced(answer):
            reason = "truncated: unbalanced brackets, quotes or code fence"
        else:
            hit = next((r for r in refusals if r.search(answer)), None)
            stripped = answer.strip()
            if hit is not None:
                reason = f"refusal: matches {hit.pattern!r}"
            elif task.kind == "classification" and row.get("label") is None:
                reason = f"format: {stripped[:60]!r} is not a label of the task"
            elif pattern is not None and not pattern.fullmatch(stripped):
                reason = "format: does not match answer_regex"
            elif validator is not None:
                try:
                    value = parse_json_answer(stripped)
                    err = next(iter(validator.iter_errors(value)), None)
                    if err is not None:
                        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                        reason = f"format: schema violation at {where}: {err.message[:80]}"
                except ValueError as e:
                    reason = f"format: {e}"
            if reason is None and len(stripped) < config.min_chars:
                reason = f"length: {len(stripped)} chars < min_chars {config.min_chars}"
            if reason is None and config.max_chars is not None and len(stripped) > config.max_chars:
                reason = f"length: {len(stripped)} chars > max_chars {config.max_chars}"
        if reason is None:
            kept.append(row)
        else:
            rejected.append(_reject(row, "heuristics", reason))
    return kept, rejected


# --- 2. self-contradiction -----------------------------------------------------------------------

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
            rejected.append(_reject(row, "consistency", reason))
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
            rep = _near(rep, "consistency")
        below = agreement < config.min_agreement
        if below and config.on_disagreement == "drop":
            for r in group:
                rejected.append(_reject(r, "consistency", f"disagreement: agreement {agreement:.2f} < "
                                        f"min_agreement {config.min_agreement:.2f} across {len(group)} samples"))
            continue
        if below:
            rep["weight"] = float(rep.get("weight", 1.0)) * agreement
        kept.append(rep)
        for i, (r, k) in enumerate(zip(group, keys)):
            if i == rep_i:
                continue
            if k == majority:
                rejected.append(_reject(r, "consistency", f"merged: same answer as sample {rep['sample']}"))
            else:
                rejected.append(_reject(r, "consistency", f"disagreement: minority answer {k[:40]!r} "
                                        f"(majority {majority[:40]!r}, agreement {agreement:.2f})"))
    return kept, rejected


# --- 3. entropy ----------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy for a list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def entropy_filter(rows: Rows, config: EntropyConfig, task: TaskConfig | None = None) -> tuple[Rows, Rows]:
    """Drop rows where the teacher was uncertain.

    The threshold is `config.max_entropy` when set, else the (100 - drop_percentile)-th percentile
    of the rows' entropies; rows strictly above it are dropped (so ties never drop everything).
    Rows without an entropy (no logprobs) are kept. A kept row is marked near the threshold when
    its entropy is above 0.8 x the absolute threshold, or above the (100 - 2 x drop_percentile)-th
    percentile.

    Args:
        rows: candidate rows with "entropy" (nats).
        config: entropy section.
        task: unused; every stage takes it so the pipeline calls stages uniformly.
    """
    values = [r["entropy"] for r in rows if r.get("entropy") is not None]
    if not values:
        return list(rows), []
    if config.max_entropy is not None:
        threshold, band = config.max_entropy, 0.8 * config.max_entropy
        how = "max_entropy"
    elif config.drop_percentile:
        threshold = _percentile(values, 100 - config.drop_percentile)
        band = _percentile(values, max(0.0, 100 - 2 * config.drop_percentile))
        how = f"{100 - config.drop_percentile:g}th percentile"
    else:
        return list(rows), []
    kept, rejected = [], []
    for row in rows:
        e = row.get("entropy")
        if e is not None and e > threshold:
            rejected.append(_reject(row, "entropy", f"entropy: {e:.3f} nats > {threshold:.3f} ({how})"))
        elif e is not None and e >= band and band < threshold:
            kept.append(_near(row, "entropy"))
        else:
            kept.append(row)
    return kept, rejected


# --- 7. mix and balance --------------------------------------------------------------------------

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
        if r["source"] == "teacher" and (r.get("_agreement") or 1.0) < 1.0:
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

    Returns training rows: {"id","text","messages","target","soft_labels","source","weight","split"}.
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
                     "soft_labels": r.get("soft_labels"), "source": "teacher",
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
