"""Deduplication throughput and quality on synthetic texts with planted duplicates.

    python bench/dedup.py [--docs 100000] [--threshold 0.85] [--baseline]

Texts are ~250 characters of words from a synthetic vocabulary. Planted: exact
duplicates (the same text with case, spacing and punctuation changed) and near
duplicates (word substitutions, so their true shingle Jaccard spreads from well
below to well above the threshold). Reported:

- exact docs/s: `exact_representatives` (normalisation included);
- end-to-end docs/s: `dedup_texts` (normalisation, exact, MinHash signatures, LSH
  banding, verification, clustering);
- peak memory of the end-to-end run (tracemalloc, numpy buffers included), in a
  separate run so tracing does not slow the timed one;
- recall: planted pairs whose true Jaccard is >= threshold + 0.1 that end up in
  the same cluster;
- precision: pairs reported as duplicates (each document and its representative)
  whose true Jaccard is >= threshold - 0.1 (the recall goal's margin, mirrored);
  strict precision (true Jaccard >= threshold) is printed too.

Timed on one core: numpy here runs single-threaded (no BLAS calls). Wall time and process CPU
time are both printed; the last line uses wall time.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.filter.dedup import dedup_texts, exact_representatives, normalize_batch  # noqa: E402


def make_corpus(n: int, seed: int = 0, exact_share: float = 0.05, near_share: float = 0.10):
    """(texts, planted) where planted = [(original_index, copy_index, kind)]."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "tra", "sen", "dor", "pel", "vi", "nu", "qua", "ber", "sto", "an", "el", "ri", "zo"]
    vocab = ["".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(8000)]

    def sentence() -> str:
        words = []
        while sum(len(w) + 1 for w in words) < 250:
            words.append(rng.choice(vocab))
        return " ".join(words)[:250].rsplit(" ", 1)[0] + "."

    texts: list[str] = []
    planted: list[tuple[int, int, str]] = []
    n_exact, n_near = int(n * exact_share), int(n * near_share)
    n_orig = n - n_exact - n_near
    for _ in range(n_orig):
        texts.append(sentence())
    for _ in range(n_exact):
        i = rng.randrange(n_orig)
        t = texts[i].upper() if rng.random() < 0.5 else "  " + texts[i].replace(" ", "  ").replace(".", "!")
        planted.append((i, len(texts), "exact"))
        texts.append(t)
    for _ in range(n_near):
        i = rng.randrange(n_orig)
        words = texts[i].split(" ")
        for _ in range(rng.choice([1, 1, 2, 3, 4, 6, 8])):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        planted.append((i, len(texts), "near"))
        texts.append(" ".join(words))
    order = list(range(n))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    return [texts[o] for o in order], [(where[a], where[b], k) for a, b, k in planted]


def shingle_sets(texts: list[str], k: int) -> list[set[str]]:
    return [{t[i:i + k] for i in range(max(1, len(t) - k + 1))} for t in normalize_batch(texts)]


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def baseline_datasketch(texts: list[str], threshold: float, num_perm: int, k: int) -> float:
    """docs/s of datasketch MinHash.bulk + MinHashLSH on the same normalised shingles."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    norm = normalize_batch(texts)
    sets = [[t[i:i + k].encode() for i in range(max(1, len(t) - k + 1))] for t in norm]
    sigs = MinHash.bulk(sets, num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, m in enumerate(sigs):
        lsh.query(m)
        lsh.insert(i, m)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="Timed runs; the best is reported.")
    ap.add_argument("--baseline", action="store_true", help="Also time datasketch on 10k documents.")
    args = ap.parse_args()

    texts, planted = make_corpus(args.docs)
    print(f"corpus: {len(texts)} docs, mean {sum(map(len, texts)) / len(texts):.0f} chars, "
          f"{sum(k == 'exact' for *_, k in planted)} exact + {sum(k == 'near' for *_, k in planted)} near planted")

    exact_s, exact_cpu = map(min, zip(*[_timed(lambda: exact_representatives(texts)) for _ in range(args.repeats)]))
    run = lambda: dedup_texts(texts, args.threshold, args.num_perm, args.shingle)  # noqa: E731
    e2e_s, e2e_cpu = map(min, zip(*[_timed(run) for _ in range(args.repeats)]))
    tracemalloc.start()
    exact, reps, _, _ = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    sets = shingle_sets(texts, args.shingle)
    t = args.threshold
    planted_j = [(a, b, kind, jaccard(sets[a], sets[b])) for a, b, kind in planted]
    should = [(a, b) for a, b, _, j in planted_j if j >= t + 0.1]
    recall = sum(reps[a] == reps[b] for a, b in should) / max(len(should), 1)
    flagged = [(i, int(r)) for i, r in enumerate(reps) if r != i]
    flagged_j = [jaccard(sets[i], sets[r]) for i, r in flagged]
    precision = sum(j >= t - 0.1 for j in flagged_j) / max(len(flagged), 1)
    strict = sum(j >= t for j in flagged_j) / max(len(flagged), 1)
    exact_recall = sum(exact[b] == exact[a] for a, b, k in planted if k == "exact") / max(
        sum(k == "exact" for *_, k in planted), 1)
    band = [(a, b) for a, b, _, j in planted_j if t <= j < t + 0.1]
    band_recall = sum(reps[a] == reps[b] for a, b in band) / max(len(band), 1)

    print(f"exact:      {len(texts) / exact_s:,.0f} docs/s ({exact_s:.3f} s), planted exact found {exact_recall:.4f}")
    print(f"end-to-end: {len(texts) / e2e_s:,.0f} docs/s ({e2e_s:.3f} s), threshold {t}, num_perm {args.num_perm}, "
          f"shingle {args.shingle}")
    print(f"cpu time (process): exact {len(texts) / exact_cpu:,.0f} docs/s, end-to-end {len(texts) / e2e_cpu:,.0f} docs/s "
          "(differs from wall time when other processes share the cores)")
    print(f"peak memory (end-to-end, traced): {peak / 2**20:.1f} MiB")
    print(f"recall on {len(should)} planted pairs with J >= {t + 0.1:.2f}: {recall:.4f}; "
          f"on {len(band)} pairs with {t:.2f} <= J < {t + 0.1:.2f}: {band_recall:.4f}")
    print(f"{len(flagged)} docs flagged: precision (J >= {t - 0.1:.2f}) {precision:.4f}, strict (J >= {t:.2f}) {strict:.4f}")
    if args.baseline:
        sub = texts[:10_000]
        print(f"datasketch baseline (MinHash.bulk + MinHashLSH, 10k docs): "
              f"{baseline_datasketch(sub, t, args.num_perm, args.shingle):,.0f} docs/s")
    print(f"end_to_end_docs_per_s={len(texts) / e2e_s:.1f} exact_docs_per_s={len(texts) / exact_s:.1f} "
          f"recall={recall:.4f} precision={precision:.4f}")


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


if __name__ == "__main__":
    main()
