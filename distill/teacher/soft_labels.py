"""Label distributions from a teacher's logprobs, for KD targets and entropy filtering.

How a label's probability is read from an OpenAI-style `logprobs.content` list:

1. The answer's first token position carries `top_logprobs`. Every alternative
   whose token, stripped and lower-cased, equals a label puts its probability on
   that label (a classifier teacher such as `distill teacher serve` emits whole
   labels as single tokens, so this is exact there).
2. Otherwise an alternative that is a proper prefix of one or more labels splits
   its probability equally among them (multi-token labels of a chat LLM: the
   first token is all we see for the alternatives).
3. Labels that received nothing share the leftover mass (1 - mass seen in top-k)
   equally, floored at `floor` each; the result is renormalised over the label
   set. So a label missing from the top-k is unlikely but never impossible,
   which keeps the KL term finite.
4. With no logprobs at all, the distribution is the answer's label with
   probability 1 - smoothing and the rest spread evenly (label smoothing), or
   None when the answer is not a label.
"""

from __future__ import annotations

import math
from typing import Any


def _norm(s: str) -> str:
    return s.strip().lower()


def label_of(text: str | None, labels: list[str]) -> str | None:
    """The label an answer names (exact match after stripping, case-insensitive), or None."""
    if text is None:
        return None
    index = {_norm(l): l for l in labels}
    return index.get(_norm(text))


def soft_labels(record: dict[str, Any], labels: list[str], floor: float = 1e-6,
                smoothing: float = 0.05) -> dict[str, float] | None:
    """The teacher's distribution over `labels` for one teacher record (see module doc)."""
    content = record.get("logprobs") or []
    first = content[0] if content else None
    tops = (first or {}).get("top_logprobs") or []
    if not tops:
        answer = label_of(record.get("response"), labels)
        if answer is None:
            return None
        rest = smoothing / max(len(labels) - 1, 1)
        return {l: (1 - smoothing if l == answer else rest) for l in labels}
    index = {_norm(l): l for l in labels}
    mass = {l: 0.0 for l in labels}
    seen = 0.0
    for alt in tops:
        p = math.exp(alt["logprob"])
        seen += p
        tok = _norm(alt["token"])
        if not tok:
            continue
        if tok in index:
            mass[index[tok]] += p
            continue
        prefixed = [l for n, l in index.items() if n.startswith(tok)]
        for l in prefixed:
            mass[l] += p / len(prefixed)
    empty = [l for l in labels if mass[l] == 0.0]
    if empty:
        share = max((1.0 - seen) / len(empty), floor)
        for l in empty:
            mass[l] = share
    total = sum(mass.values())
    return {l: m / total for l, m in mass.items()}


def entropy(dist: dict[str, float] | list[float]) -> float:
    """Shannon entropy in nats."""
    values = dist.values() if isinstance(dist, dict) else dist
    return -sum(p * math.log(p) for p in values if p > 0)


def token_entropy(record: dict[str, Any]) -> float | None:
    """Mean per-token entropy of a generated answer, from top_logprobs (truncated to the top-k seen)."""
    content = record.get("logprobs") or []
    values = []
    for tok in content:
        tops = tok.get("top_logprobs") or []
        if not tops:
            continue
        ps = [math.exp(t["logprob"]) for t in tops]
        rest = max(0.0, 1.0 - sum(ps))
        values.append(entropy(ps + ([rest] if rest > 1e-12 else [])))
    return sum(values) / len(values) if values else None
