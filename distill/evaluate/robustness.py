"""Deterministic rephrasings of holdout inputs and the out-of-domain set.

A production student sees typos, shouting, missing punctuation and the odd
greeting that the training data rarely has. Each rephrasing below is generated
from the holdout text with a random generator seeded by the row id and the
rephrasing kind, so two runs (and two students) are measured on exactly the
same perturbed inputs and their robustness numbers are comparable.

The out-of-domain set answers a different question: given an input that is no
task input at all, does the student abstain (low top probability) instead of
confidently naming a label? `distill/data/ood.txt` bundles ~100 such queries,
used when `evaluate.ood_path` is unset.
"""

from __future__ import annotations

import random
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.config import BUNDLED_DATA, ConfigError

KINDS = ("typos", "casing", "punctuation", "word_order", "template")
BUNDLED_OOD = BUNDLED_DATA / "ood.txt"

_TEMPLATES = (
    "Hi, {text} Thanks!",
    "Quick question: {text}",
    "{text} Can you help me with this?",
    "Hello there. {text}",
    "I have a problem. {text} Please advise.",
    "Sorry to bother you, but {text}",
)
_PUNCT = re.compile(r"[^\w\s]")


def _rng(row_id: str, kind: str) -> random.Random:
    return random.Random(zlib.crc32(f"{row_id}\x00{kind}".encode()))


def _typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4]
    if not candidates:
        return text
    # About one word in six gets a keyboard slip, and always at least one.
    n = max(1, round(len(candidates) / 6))
    for i in sorted(rng.sample(candidates, n)):
        w = words[i]
        letters = [j for j, c in enumerate(w) if c.isalpha()]
        j = rng.choice(letters[:-1])
        op = rng.choice(("swap", "drop", "double"))
        if op == "swap":
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif op == "drop":
            w = w[:j] + w[j + 1:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def _casing(text: str, rng: random.Random) -> str:
    style = rng.choice(("upper", "lower", "title"))
    return text.upper() if style == "upper" else text.lower() if style == "lower" else text.title()


def _punctuation(text: str, rng: random.Random) -> str:
    bare = re.sub(r"\s+", " ", _PUNCT.sub("", text)).strip()
    return bare if rng.random() < 0.5 else bare + rng.choice(("??", "!!!", "...", " ?"))


def _word_order(text: str, rng: random.Random) -> str:
    clauses = [c.strip() for c in text.split(",") if c.strip()]
    if len(clauses) >= 2:
        i = rng.randrange(len(clauses) - 1)
        clauses[i], clauses[i + 1] = clauses[i + 1], clauses[i]
        return ", ".join(clauses)
    words = text.split()
    if len(words) < 3:
        return text
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _template(text: str, rng: random.Random) -> str:
    body = text.strip()
    if rng.random() < 0.5 and body[:1].isupper() and body[1:2].islower():
        body = body[0].lower() + body[1:]
    return rng.choice(_TEMPLATES).format(text=body)


_REPHRASE = {"typos": _typos, "casing": _casing, "punctuation": _punctuation, "word_order": _word_order,
             "template": _template}


def rephrase(text: str, kind: str, row_id: str) -> str:
    """One deterministic rephrasing of `text`.

    Args:
        text: the original input.
        kind: one of KINDS.
        row_id: seeds the generator, so the same row always gets the same rephrasing.
    """
    if kind not in _REPHRASE:
        raise ValueError(f"unknown rephrasing {kind!r}; expected one of {', '.join(KINDS)}")
    return _REPHRASE[kind](text, _rng(row_id, kind))


def pick_rows(rows: Sequence[dict[str, Any]], max_rows: int | None) -> list[dict[str, Any]]:
    """A deterministic, label-blind subset of at most `max_rows` rows (ordered by a hash of the id)."""
    if max_rows is None or len(rows) <= max_rows:
        return list(rows)
    ranked = sorted(rows, key=lambda r: (zlib.crc32(str(r["id"]).encode()), str(r["id"])))
    return ranked[:max_rows]


def rephrased_rows(rows: Sequence[dict[str, Any]], kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
    """Every row rephrased every way: [{"id", "source_id", "kind", "text", "gold"}] (unchanged texts kept)."""
    out = []
    for r in rows:
        for kind in kinds:
            out.append({"id": f"{r['id']}#{kind}", "source_id": r["id"], "kind": kind,
                        "text": rephrase(r["text"], kind, str(r["id"])), "gold": r.get("gold")})
    return out


def load_ood(path: str | Path | None = None) -> list[str]:
    """Out-of-domain texts, one per line (blank lines and lines starting with '#' skipped)."""
    path = Path(path) if path is not None else BUNDLED_OOD
    if not path.exists():
        raise ConfigError(f"{path}: out-of-domain file not found (evaluate.ood_path)")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t and not t.startswith("#")]
    if not texts:
        raise ConfigError(f"{path}: no out-of-domain texts (evaluate.ood_path)")
    return texts


def abstain_rate(probs: np.ndarray, threshold: float) -> float:
    """Share of rows whose top probability is below `threshold` (the student would abstain or fall back)."""
    probs = np.asarray(probs)
    if len(probs) == 0:
        return float("nan")
    return float(np.mean(probs.max(axis=1) < threshold))
