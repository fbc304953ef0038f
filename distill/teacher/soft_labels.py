"""Label distributions from a teacher's logprobs, for KD targets and entropy filtering.

A chat model spells a label in several sub-word tokens ("card", "_arr", "ival"),
possibly inside a JSON answer, and OpenAI-style `logprobs.content` gives, at
every position of the answer, the chosen token and the `top_logprobs`
alternatives. `soft_labels` walks the answer from where it starts spelling its
label and reads the labels' trie off those positions:

1. the answer's label gets the product of its tokens' probabilities;
2. at position k, an alternative token that branches off the chosen path puts
   P(prefix) x P(alternative) on the labels that continue with it (the labels
   whose spelling starts with prefix + alternative), shared only among them; an
   alternative that spells a whole label (a single-token classifier such as
   `distill teacher serve`) goes to that label alone;
3. labels that received nothing share the mass never seen (1 - total seen),
   each floored at `floor`; the result is renormalised over the label set, so a
   label missing from the top-k is unlikely but never impossible (finite KL);
4. a record scored label by label (`generation.soft_labels: score`, see
   distill.teacher.scoring) carries its exact distribution in "label_scores", which
   is used as it is (floored and renormalised);
5. with no logprobs at all (`generation.soft_labels: hard`), the distribution is
   the answer's label with probability 1 - smoothing and the rest spread evenly,
   or None when the answer is not a label.

Spellings are compared with case folded and spaces/hyphens read as underscores,
as `distill.teacher.labels.map_answer` reads answers.

What each mode costs per row (`generation.soft_labels`; L labels):
- `trie` asks for `top_logprobs` on the one answer request (no extra request, a few
  more completion bytes); exact for the labels the top-k reached, floored for the rest.
- `score` asks the answer without logprobs, then scores every label: L requests of
  about (prompt + answer) prompt tokens and 1 completion token each (score_api
  `prompt_logprobs`), or one request of L x (prompt + answer) prompt tokens and L
  completion tokens (score_api `echo`). Exact; about L times the prompt tokens.
- `hard` asks for none (cheapest, but no uncertainty for KD or the entropy filter).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from distill.teacher.labels import label_span, map_answer
from distill.teacher.signals import token_logprobs


def _fold(s: str) -> str:
    return re.sub(r"[\s\-]", "_", s.lower())


def label_of(text: str | None, labels: list[str], label_key: str = "label") -> str | None:
    """The label an answer names, read as a person would (see distill.teacher.labels.map_answer), or None."""
    return map_answer(text, labels, label_key)


@functools.lru_cache(maxsize=16)
def _folded(labels: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """label -> folded form, and back; once per label set."""
    keys = {l: _fold(l) for l in labels}
    return keys, {k: l for l, k in keys.items()}


def _consistent(key: str, spelled: str) -> bool:
    """Whether a label (folded) can be what `spelled` (folded, from the label's start) is spelling."""
    if key.startswith(spelled):
        return True
    return spelled.startswith(key) and not (spelled[len(key)].isalnum() or spelled[len(key)] == "_")


def trie_mass(content: list[dict], labels: list[str], answer: str, label_key: str = "label") -> dict[str, float] | None:
    """Probability mass per label read from every position of the answer (steps 1-2 of the module doc).

    Args:
        content: OpenAI `logprobs.content`: [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}].
        labels: the label set.
        answer: the label the answer names (from map_answer).
        label_key: the JSON field holding the label in a structured answer.

    Returns {label: mass} (unnormalised, labels not seen are absent), or None when the tokens do not
    spell the answer's label.
    """
    text = "".join(str(t.get("token") or "") for t in content)
    start = label_span(text, answer, label_key)
    if start is None:
        return None
    keys, whole = _folded(tuple(labels))
    mass: dict[str, float] = {}
    alive = set(labels)
    path, offset = 0.0, 0
    for tok in content:
        chosen, a = str(tok.get("token") or ""), offset
        offset += len(chosen)
        if offset <= start:
            continue  # wholly before the label: the answer's frame ({"label": ", "Intent: ")
        lead = text[a:start] if a < start else ""
        before = _fold(text[start:a]) if a >= start else ""
        spelled = before + _fold(chosen[len(lead):])
        nxt = {l for l in alive if _consistent(keys[l], spelled)}
        base = math.exp(path)
        for alt in tok.get("top_logprobs") or []:
            t = str(alt.get("token") or "")
            if t == chosen or (lead and not t.startswith(lead)):
                continue  # the chosen token itself, or a different frame before the label starts
            r = before + _fold(t[len(lead):])
            group = [whole[r]] if r in whole and whole[r] in alive else [l for l in alive if _consistent(keys[l], r)]
            group = [l for l in group if l not in nxt]
            for l in group:
                mass[l] = mass.get(l, 0.0) + base * math.exp(alt["logprob"]) / len(group)
        path += float(tok.get("logprob") or 0.0)
        alive = nxt
        if alive == {answer} and len(spelled) >= len(keys[answer]):
            break  # the label is spelled out; what follows (closing quote, a full stop) is not its mass
    if answer not in alive:
        return None
    mass[answer] = mass.get(answer, 0.0) + math.exp(path)
    return mass


def soft_labels(record: dict[str, Any], labels: list[str], floor: float = 1e-6,
                smoothing: float = 0.05, label_key: str = "label") -> dict[str, float] | None:
    """The teacher's distribution over `labels` for one teacher record (see module doc)."""
    answer = label_of(record.get("response"), labels, label_key)
    scored = record.get("label_scores")
    if isinstance(scored, dict) and answer and all(l in scored for l in labels):
        full = {l: max(float(scored[l]), floor) for l in labels}
        total = sum(full.values())
        return {l: m / total for l, m in full.items()}
    stored = record.get("label_dist")
    if isinstance(stored, dict) and answer and set(stored) == set(labels):
        return stored  # recovered when the answer was stored (see with_label_dists)
    content = token_logprobs(record) or []
    mass = trie_mass(content, labels, answer, label_key) if answer and content else None
    if mass is None:
        if answer is None:
            return None
        rest = smoothing / max(len(labels) - 1, 1)
        return {l: (1 - smoothing if l == answer else rest) for l in labels}
    seen = sum(mass.values())
    empty = [l for l in labels if mass.get(l, 0.0) == 0.0]
    share = max((1.0 - seen) / len(empty), floor) if empty else 0.0
    full = {l: mass.get(l, 0.0) or share for l in labels}
    total = sum(full.values())
    return {l: m / total for l, m in full.items()}


def with_label_dists(records: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Records with "label_dist", the distribution each answer carries, recovered once when it is stored
    (a classification dataset keeps that instead of re-reading logprobs at every use)."""
    for rec in records:
        rec.pop("label_dist", None)  # recomputed from what the record holds now (a re-ask changes the answer)
        if rec.get("status") == "done":
            dist = soft_labels(rec, labels)
            if dist is not None:
                rec["label_dist"] = {l: round(p, 6) for l, p in dist.items()}
    return records


def entropy(dist: dict[str, float] | list[float]) -> float:
    """Shannon entropy in nats."""
    values = dist.values() if isinstance(dist, dict) else dist
    return -sum(p * math.log(p) for p in values if p > 0)


def token_entropy(record: dict[str, Any]) -> float | None:
    """Mean per-token entropy of a generated answer, from top_logprobs (truncated to the top-k seen)."""
    content = token_logprobs(record) or []
    values = []
    for tok in content:
        tops = tok.get("top_logprobs") or []
        if not tops:
            continue
        ps = [math.exp(t["logprob"]) for t in tops]
        rest = max(0.0, 1.0 - sum(ps))
        values.append(entropy(ps + ([rest] if rest > 1e-12 else [])))
    return sum(values) / len(values) if values else None
