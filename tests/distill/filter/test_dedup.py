import random

import numpy as np
import pytest

from distill.config import DedupConfig
from distill.filter.dedup import (
    dedup,
    dedup_texts,
    exact_representatives,
    lsh_params,
    minhash_signatures,
    near_representatives,
    normalize,
    normalize_batch,
)

ALPHA = "abcdefghijklmnopqrstuvwxyz      "


def shingles(text, k=5):
    t = normalize(text)
    return {t[i:i + k] for i in range(max(1, len(t) - k + 1))}


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def mutate(text, edits, rng):
    s = list(text)
    for _ in range(edits):
        s[rng.randrange(len(s))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(s)


def test_normalize_clean_noisy_malformed():
    assert normalize("  Hello,   World!! ") == "hello world"
    assert normalize("a\tb\n\nc") == "a b c"
    assert normalize("ＡＢＣ\u00a0déjà-vu") == "abc déjà vu"  # NFKC folds full-width and NBSP
    assert normalize("nul\x00inside") == "nul inside"
    assert normalize_batch(["", None, "...", "x"]) == ["", "", "", "x"]


def test_exact_representatives():
    texts = ["Where is my card?", "where is my card", "WHERE  is my card ?!", "another one", "", None]
    assert exact_representatives(texts) == [0, 0, 0, 3, 4, 4]


def test_signatures_estimate_jaccard_without_bias():
    rng = random.Random(0)
    base = ["".join(rng.choices(ALPHA, k=rng.choice([40, 120, 250]))) for _ in range(150)]
    pairs = [(b, mutate(b, rng.randint(0, len(b) // 6), rng)) for b in base]
    sig = minhash_signatures([t for p in pairs for t in p], num_perm=128, shingle=5)
    est = (sig[0::2] == sig[1::2]).mean(axis=1)
    true = np.array([jaccard(a, b) for a, b in pairs])
    assert abs((est - true).mean()) < 0.01  # unbiased
    assert np.abs(est - true).mean() < 0.05  # about sqrt(J(1-J)/128)
    assert true.min() < 0.5 < true.max()  # the pairs span the similarity range


def test_signatures_short_and_empty_texts():
    sig = minhash_signatures(["ab", "abc", "", "ab", ""])
    assert (sig[0] == sig[3]).all() and (sig[0] == sig[1]).mean() < 0.1
    assert not (sig[1] == 0xFFFFFFFF).any()  # densification fills every bin of a non-empty text
    with pytest.raises(ValueError):
        minhash_signatures(["x"], num_perm=0)


def test_lsh_params_put_the_s_curve_at_the_threshold():
    for t in (0.5, 0.7, 0.85):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
        s = lambda j: 1 - (1 - j ** r) ** b  # noqa: E731
        assert s(t - 0.15) < 0.5 < s(t + 0.1)


def test_near_duplicates_found_and_unrelated_texts_kept_apart():
    rng = random.Random(1)
    originals = ["".join(rng.choices(ALPHA, k=250)) for _ in range(300)]
    near = [mutate(t, 2, rng) for t in originals[:100]]  # J about 0.93
    far = [mutate(t, 40, rng) for t in originals[100:200]]  # J about 0.3
    texts = originals + near + far
    exact, reps, sigs, sims = dedup_texts(texts, threshold=0.8)
    assert exact == list(range(len(texts)))
    found = sum(reps[300 + i] == i for i in range(100))
    assert found >= 97
    assert all(reps[400 + i] == 400 + i for i in range(100))
    assert all(reps[i] == i for i in range(300))
    assert sims[300:400].mean() > 0.85


def test_near_representatives_chain_to_the_earliest():
    sig = np.array([[1, 2, 3, 4], [1, 2, 3, 9], [7, 2, 3, 9], [5, 6, 7, 8]], dtype=np.uint32)
    reps, sims = near_representatives(sig, threshold=0.75, bands=4, rows=1)
    assert reps.tolist() == [0, 0, 0, 3]  # 2 is linked to 1, which is linked to 0
    assert sims[1] == pytest.approx(0.75)


def _row(i, text, response="card_arrival"):
    return {"id": f"r{i}", "sample": 0, "text": text, "response": response}


def test_dedup_stage_prompt_answer_both_and_malformed_rows():
    rows = [_row(0, "How do I top up my card with cash at a shop today?"),
            _row(1, "how do I top up my card with cash at a shop today", "top_up_failed"),
            _row(2, "How do I top up my card with cash at a shop, today??!"),
            _row(3, "How do I top up my card with cash at a shop today please?"),
            _row(4, "Completely different question about exchange rates"),
            _row(5, None, None), _row(6, None, None)]
    kept, rejected = dedup(rows, DedupConfig(on="prompt", threshold=0.7))
    assert [r["id"] for r in kept] == ["r0", "r4", "r5"]
    why = {r["id"]: r["reason"] for r in rejected}
    assert why["r1"] == "exact duplicate: same prompt as r0" and why["r6"].startswith("exact duplicate")
    assert why["r3"].startswith("near duplicate: prompt") and why["r3"].endswith("similar to r0")
    assert all(r["stage"] == "dedup" for r in rejected)
    kept, _ = dedup(rows, DedupConfig(on="both", near=False))
    assert [r["id"] for r in kept] == ["r0", "r1", "r3", "r4", "r5"]  # r1's answer differs
    kept, _ = dedup(rows, DedupConfig(on="answer", near=False))
    assert [r["id"] for r in kept] == ["r0", "r1", "r5"]
    assert dedup([], DedupConfig()) == ([], [])
