"""Compact teacher signals: top-k logprobs as small arrays, the label distribution recovered from them
as from the raw list, and the raw list kept only when asked for (audit)."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

from distill.config import GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.teacher.cache import ResponseCache
from distill.teacher.generation import generate
from distill.teacher.signals import compact, expand, token_logprobs
from distill.teacher.soft_labels import soft_labels, token_entropy

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])


def free_text(n: int, seed: int = 0) -> list[dict]:
    """A generated answer as a provider returns it at top_logprobs 20: sub-word tokens, 20 distinct alternatives."""
    rng = random.Random(seed)
    pieces = ["th", "e", "an", "ing", "re", "on", "at", "er", "st", "ou", "al", "ed", "ly", " "]
    vocab = sorted({(" " if rng.random() < .5 else "") + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
                    for _ in range(30000)})
    weights = [1 / (i + 1) for i in range(len(vocab))]
    out = []
    for _ in range(n):
        toks: list[str] = []
        while len(toks) < 20:
            t = rng.choices(vocab, weights)[0]
            if t not in toks:
                toks.append(t)
        lps = sorted((3 * math.log(rng.random()) for _ in toks), reverse=True)
        alts = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in zip(toks, lps)]
        out.append({**alts[0], "top_logprobs": alts})
    return out


@pytest.mark.parametrize("n", [16, 64, 256])
def test_top20_is_under_200_bytes_a_token_and_round_trips(n):
    content = free_text(n, seed=n)
    raw = len(json.dumps(content))
    small = len(json.dumps(compact(content)))
    assert small / n <= 200 < raw / n  # the provider's list is ~2 KB a token
    back = expand(compact(content))
    for a, b in zip(content, back):
        assert b["token"] == a["token"] and b["logprob"] == pytest.approx(a["logprob"], abs=0.01)
        assert {t["token"]: round(t["logprob"], 1) for t in b["top_logprobs"]} == \
            pytest.approx({t["token"]: round(t["logprob"], 1) for t in a["top_logprobs"]}, abs=0.11)
    assert token_entropy({"topk": compact(content)}) == pytest.approx(token_entropy({"logprobs": content}), rel=0.01)


def test_label_distribution_from_compact_matches_the_raw_list():
    frame, surface = ('{"label": "', '"}'), (lambda l: l)
    for text in list(GOLDS)[::40]:
        truth = standin.true_distribution(text, GOLDS[text], LABELS)
        answer = max(truth, key=truth.get)
        content = standin.logprob_content(frame, surface, answer, truth, 20)
        reply = "".join(c["token"] for c in content)
        raw = soft_labels({"response": reply, "logprobs": content}, LABELS)
        small = soft_labels({"response": reply, "logprobs": None, "topk": compact(content)}, LABELS)
        assert max(small, key=small.get) == answer
        assert 0.5 * sum(abs(raw[l] - small[l]) for l in LABELS) < 0.01


def test_run_stores_compact_signals_and_label_distribution_raw_only_for_audit(tmp_path):
    texts = list(GOLDS)[:12]
    rows = [{"id": i, "messages": [{"role": "system", "content": "Classify the message as one of: " + ", ".join(LABELS)}, {"role": "user", "content": t}]}
            for i, t in enumerate(texts)]
    with start_in_thread(standin.build_app(GOLDS, LABELS)) as srv:
        teacher = TeacherConfig(base_url=srv.url + "/v1", model="standin")
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", backoff_base_s=0.01, top_logprobs=20, max_tokens=32)
        small = generate(rows, teacher, gen, labels=LABELS)
        audit = generate(rows, teacher, gen.model_copy(update={"keep_raw_logprobs": True,
                                                               "cache_path": tmp_path / "a.sqlite"}), labels=LABELS)
    assert small.summary["done"] == audit.summary["done"] == 12
    for s, a in zip(small.records, audit.records):
        assert s["response"] == a["response"]  # the raw text is always kept
        assert s["logprobs"] is None and s["topk"] and a["logprobs"] and a["topk"]
        dist, expected = s["label_dist"], soft_labels({**a, "label_dist": None}, LABELS)
        assert set(dist) == set(LABELS) and sum(dist.values()) == pytest.approx(1.0, abs=1e-4)
        assert 0.5 * sum(abs(dist[l] - expected[l]) for l in LABELS) < 0.01
        assert soft_labels(s, LABELS) is s["label_dist"]  # read back as stored, not recomputed
        assert [t["token"] for t in token_logprobs(s)] == [t["token"] for t in a["logprobs"]]
    sizes = {}
    for name in ("c", "a"):
        cache = ResponseCache(tmp_path / f"{name}.sqlite")
        sizes[name] = cache.size()
        cache.close()
    assert sizes["c"][1] * 3 < sizes["a"][1]  # what the cache keeps per response, compact versus audit
