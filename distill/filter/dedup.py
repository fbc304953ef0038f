"""Exact and near-duplicate detection over texts, and the dedup filter stage.

Normal form (`normalize`): NFKC, lower case, ASCII punctuation and all whitespace
runs turned into single spaces, leading/trailing spaces dropped. It is computed
for a whole batch at once on a numpy array of code points, since a per-text
Python loop alone would cost more than the whole exact stage may.

Exact duplicates: texts with equal normal forms. The normal form itself is the
dict key, so there are no hash collisions to worry about.

Near duplicates: MinHash over character shingles of the normal form, with LSH
banding. The signature is computed with one-permutation hashing (one 64-bit hash
per shingle; its top bits pick one of `num_perm` bins, its low 32 bits compete
for that bin's minimum) plus optimal densification (Shrivastava, 2017) for bins
that received no shingle: an empty bin copies the value of a donor bin chosen by
a hash of (bin, attempt) that is the same for every document, so two documents
collide in a bin with probability equal to their Jaccard similarity, as with
classic MinHash. This costs O(shingles) per document instead of
O(shingles x permutations), and runs vectorised over many documents at once.

Candidate pairs from the LSH bands are verified on the full signature (share of
equal bins >= threshold) before two documents are linked; linked documents form
clusters (union-find) whose first member, in input order, is the representative.
"""

from __future__ import annotations

import string
import unicodedata
from functools import lru_cache
from typing import Any

import numpy as np

from distill.config import DedupConfig, TaskConfig

_EMPTY = np.uint32(0xFFFFFFFF)
_CHUNK_DOCS = 8192  # bounds peak memory: per-position arrays exist for one chunk at a time
_SPACE = 32
_LUT = np.arange(128, dtype=np.uint32)
_LUT[[ord(c) for c in string.punctuation + string.whitespace]] = _SPACE
_LUT8 = np.concatenate([_LUT, np.arange(128, 256, dtype=np.uint32)]).astype(np.uint8)
# Non-ASCII whitespace that NFKC leaves alone (NBSP and the U+2000 block become plain spaces under NFKC).
_UNICODE_SPACES = np.array([0x85, 0x1680, 0x2028, 0x2029, 0x3000, 0x200B, 0xFEFF], dtype=np.uint32)


def _normal_codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal forms of `texts` as one flat code point array, documents separated by 0.

    The array is uint8 when every text is ASCII (a quarter of the memory traffic), else uint32.
    Returns (codes, starts, lengths) with one start offset and length per text.
    """
    n = len(texts)
    if not n:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    joined = "\x00".join(texts)
    if joined.count("\x00") != n - 1:  # a text holding NUL would shift every later document
        joined = "\x00".join(t.replace("\x00", " ") for t in texts)
    if joined.isascii():
        c = _LUT8[np.frombuffer(joined.lower().encode("ascii"), dtype=np.uint8)]
    else:
        joined = unicodedata.normalize("NFKC", joined).lower()
        raw = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        c = np.where(raw < 128, _LUT[np.minimum(raw, 127)], raw)
        c[np.isin(c, _UNICODE_SPACES)] = _SPACE
    # Collapse each run of spaces to its last space, then drop spaces that touch a document edge.
    space = c == _SPACE
    run_end = np.ones(c.size, dtype=bool)
    run_end[:-1] = ~(space[:-1] & space[1:])
    c = c[run_end]
    space = c == _SPACE
    edge = np.ones(c.size + 2, dtype=bool)  # edge[i + 1]: position i is a separator (or outside)
    edge[1:-1] = c == 0
    c = c[~(space & (edge[:-2] | edge[2:]))]
    seps = np.flatnonzero(c == 0)
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    starts[1:] = seps + 1
    ends = np.empty(n, dtype=np.int64)
    ends[:-1] = seps
    ends[-1] = c.size
    return c, starts, ends - starts


def _decode(codes: np.ndarray) -> list[str]:
    if codes.dtype == np.uint8:
        return codes.tobytes().decode("ascii").split("\x00")
    return codes.tobytes().decode("utf-32-le").split("\x00")


def normalize_batch(texts: list[str | None]) -> list[str]:
    """Normal forms (see module doc) of many texts; None counts as empty."""
    out: list[str] = []
    for lo in range(0, len(texts), _CHUNK_DOCS):
        out += _decode(_normal_codes([t or "" for t in texts[lo:lo + _CHUNK_DOCS]])[0])
    return out


def normalize(text: str | None) -> str:
    """Normal form of one text: NFKC, lower case, punctuation removed, whitespace collapsed."""
    return normalize_batch([text])[0]


def exact_representatives(texts: list[str]) -> list[int]:
    """For each text, the index of the first text with the same normal form (itself if unique)."""
    first: dict[str, int] = {}
    return [first.setdefault(t, i) for i, t in enumerate(normalize_batch(texts))]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place: shingle polynomials are far from uniform, bins need uniform bits."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _donors(num_perm: int, seed: int, attempts: int = 24) -> np.ndarray:
    """(num_perm, attempts) donor bin for each empty bin and attempt; identical for every document."""
    grid = (np.arange(num_perm, dtype=np.uint64)[:, None] * np.uint64(1_000_003)
            + np.arange(attempts, dtype=np.uint64)[None, :] + np.uint64(seed * 7919 + 1))
    return (_mix64(grid) % np.uint64(num_perm)).astype(np.int64)


def _chunk_signatures(codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray, num_perm: int,
                      shingle: int, seed: int, donors: np.ndarray) -> np.ndarray:
    n = starts.size
    k = shingle
    size = codes.size
    wide = np.concatenate([codes.astype(np.uint64), np.zeros(k, dtype=np.uint64)])
    # Polynomial hash of the k characters from every position, built from contiguous slices (no
    # gathers); positions whose window crosses a document end are discarded below.
    h = np.full(size, np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed), dtype=np.uint64)
    mult = np.uint64(0x100000001B3)
    for j in range(k):
        h *= mult
        h += wide[j:j + size]
        h += np.uint64(j + 1)
    is_sep = np.concatenate([codes == 0, np.ones(k, dtype=bool)])
    seps_upto = np.cumsum(is_sep)  # separators at or before each position
    # A window [p, p+k) is valid when it holds no separator (nor the end of the buffer).
    valid = (seps_upto[k - 1:k - 1 + size] - seps_upto[:size] + is_sep[:size]) == 0
    keep = np.flatnonzero(valid)
    doc = seps_upto[keep] - is_sep[keep]
    h = h[keep]
    counts = np.maximum(lengths - k + 1, 0)
    short = np.flatnonzero((lengths > 0) & (lengths < k))
    if short.size:
        # A document shorter than a shingle is one shingle: itself, zero-padded.
        hs = np.full(short.size, np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed), dtype=np.uint64)
        for j in range(k):
            hs *= mult
            cj = wide[starts[short] + j]
            cj[lengths[short] <= j] = 0
            hs += cj + np.uint64(j + 1)
        h = np.concatenate([h, hs])
        doc = np.concatenate([doc, short])
        counts[short] = 1
    _mix64(h)
    bins = ((h >> np.uint64(32)) * np.uint64(num_perm)) >> np.uint64(32)
    vals = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    sig = np.full(n * num_perm, _EMPTY, dtype=np.uint32)
    np.minimum.at(sig, doc * num_perm + bins.astype(np.int64), vals)
    # Densify: only the empty cells are visited, and each attempt retires the ones it filled, so the
    # work shrinks geometrically instead of touching the whole signature matrix per attempt.
    todo = np.flatnonzero(sig == _EMPTY)
    if todo.size:
        filled = sig.copy()
        cell_doc, cell_bin = np.divmod(todo, num_perm)
        keep = counts[cell_doc] > 0  # an empty document stays all-empty
        cell_doc, cell_bin, todo = cell_doc[keep], cell_bin[keep], todo[keep]
        for attempt in range(donors.shape[1]):
            if not todo.size:
                break
            got = sig[cell_doc * num_perm + donors[cell_bin, attempt]]
            ok = got != _EMPTY
            # The attempt number is folded in so a copied value differs from the donor's own value.
            filled[todo[ok]] = got[ok] ^ np.uint32((attempt + 1) * 0x9E3779B1 & 0xFFFFFFFF)
            cell_doc, cell_bin, todo = cell_doc[~ok], cell_bin[~ok], todo[~ok]
        # Documents with very few shingles can exhaust the random attempts; the next non-empty bin
        # to the right (same rule for every document) finishes them.
        for step in range(1, num_perm):
            if not todo.size:
                break
            got = sig[cell_doc * num_perm + (cell_bin + step) % num_perm]
            ok = got != _EMPTY
            filled[todo[ok]] = got[ok] ^ np.uint32((step + 1000) * 0x9E3779B1 & 0xFFFFFFFF)
            cell_doc, cell_bin, todo = cell_doc[~ok], cell_bin[~ok], todo[~ok]
        sig = filled
    return sig.reshape(n, num_perm)


def _check_params(num_perm: int, shingle: int) -> None:
    if not 1 <= num_perm <= 4096 or shingle < 1:
        raise ValueError(f"num_perm must be in 1..4096 and shingle >= 1 (got {num_perm}, {shingle})")


def minhash_signatures(texts: list[str], num_perm: int = 128, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32 of character shingles of the normal forms.

    Args:
        texts: the texts (normalised here).
        num_perm: signature length; the Jaccard estimate's standard error is about sqrt(J(1-J)/num_perm).
        shingle: characters per shingle.
        seed: hash seed; signatures are comparable only under the same seed, num_perm and shingle.
    """
    return dedup_texts(texts, num_perm=num_perm, shingle=shingle, seed=seed, near=False)[2]


def dedup_texts(texts: list[str], threshold: float = 0.85, num_perm: int = 128, shingle: int = 5,
                seed: int = 0, near: bool = True) -> tuple[list[int], np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Exact and near-duplicate clusters of `texts`, normalising each chunk once for both.

    Args:
        texts: the texts to compare.
        threshold: Jaccard similarity (of shingle sets) at which two texts are near-duplicates.
        num_perm, shingle, seed: MinHash parameters (see `minhash_signatures`).
        near: also cluster near-duplicates among the exact-unique texts.

    Returns (exact_reps, near_reps, signatures, near_sims): exact_reps[i] is the first text with
    the same normal form; near_reps[i] (None unless `near`) is the representative of i's cluster,
    chained through its exact representative, and near_sims[i] its estimated similarity to it.
    """
    _check_params(num_perm, shingle)
    donors = _donors(num_perm, seed)
    first: dict[str, int] = {}
    exact: list[int] = []
    parts = []
    for lo in range(0, len(texts), _CHUNK_DOCS):
        chunk = [t or "" for t in texts[lo:lo + _CHUNK_DOCS]]
        codes, starts, lengths = _normal_codes(chunk)
        for i, key in enumerate(_decode(codes), lo):
            exact.append(first.setdefault(key, i))
        parts.append(_chunk_signatures(codes, starts, lengths, num_perm, shingle, seed, donors))
    sigs = np.concatenate(parts) if parts else np.zeros((0, num_perm), dtype=np.uint32)
    if not near:
        return exact, None, sigs, None
    unique = np.flatnonzero(np.asarray(exact, dtype=np.int64) == np.arange(len(exact)))
    reps = np.asarray(exact, dtype=np.int64).copy()
    sims = np.ones(len(exact))
    if unique.size > 1:
        local, local_sims = near_representatives(sigs[unique], threshold)
        reps[unique] = unique[local]
        sims[unique] = local_sims
    reps = reps[reps]  # an exact duplicate follows its representative into that one's near cluster
    return exact, reps, sigs, sims


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false-positive and false-negative areas of the
    LSH S-curve around `threshold` (datasketch's rule). False negatives weigh 0.9: every candidate
    pair is verified on its full signature, so a false positive costs one comparison while a false
    negative is a duplicate left in the data."""
    lo = np.linspace(0, threshold, 200)
    hi = np.linspace(threshold, 1, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def near_representatives(signatures: np.ndarray, threshold: float, bands: int | None = None,
                         rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster documents whose estimated Jaccard similarity reaches `threshold`.

    Args:
        signatures: (n, num_perm) from `minhash_signatures`.
        threshold: Jaccard similarity at which two documents are near-duplicates.
        bands, rows: LSH banding; chosen by `lsh_params` when unset.

    Returns (representative index per document, estimated similarity to it; 1.0 for representatives).
    """
    n, num_perm = signatures.shape
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm)
    parent = np.arange(n, dtype=np.int64)
    left_all, right_all = [], []
    for b in range(bands):
        band = np.ascontiguousarray(signatures[:, b * rows:(b + 1) * rows])
        keys = np.full(n, np.uint64(b + 1), dtype=np.uint64)
        for c in range(rows):
            keys *= np.uint64(0x100000001B3)
            keys += band[:, c].astype(np.uint64)
            _mix64(keys)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = np.flatnonzero(sk[1:] == sk[:-1]) + 1
        if not same.size:
            continue
        # Each bucket member is paired with the bucket's first member (a star, not all pairs), which
        # keeps big buckets linear; clusters are still connected through union-find.
        run_start = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
        first_of = np.repeat(run_start, np.diff(np.append(run_start, n)))
        left_all.append(order[first_of[same]])
        right_all.append(order[same])
    sims = np.ones(n)
    if left_all:
        pairs = np.unique(np.stack([np.concatenate(left_all), np.concatenate(right_all)], axis=1), axis=0)
        est = (signatures[pairs[:, 0]] == signatures[pairs[:, 1]]).mean(axis=1)
        ok = pairs[est >= threshold]
        for a, c in ok.tolist():
            ra, rc = _find(parent, a), _find(parent, c)
            if ra != rc:
                parent[max(ra, rc)] = min(ra, rc)  # the earliest document represents the cluster
    reps = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    dup = np.flatnonzero(reps != np.arange(n))
    if dup.size:
        sims[dup] = (signatures[dup] == signatures[reps[dup]]).mean(axis=1)
    return reps, sims


def _dedup_text(row: dict[str, Any], on: str) -> str:
    if on == "prompt":
        return row.get("text") or ""
    if on == "answer":
        return row.get("response") or ""
    # A control character no text normally holds keeps "ab"+"c" and "a"+"bc" apart.
    return f"{row.get('text') or ''} \x1f {row.get('response') or ''}"


def dedup(rows: list[dict[str, Any]], config: DedupConfig, task: TaskConfig | None = None,
          seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep one representative (the first in input order) per cluster of duplicates.

    `config.on` picks the compared text: "prompt" (the input), "answer" (the teacher's answer) or
    "both" (input and answer together: a row is dropped only when the pair repeats).

    Args:
        rows: candidate rows.
        config: the dedup section (exact always; near-duplicates too when `config.near`).
        task: unused; every stage takes it so the pipeline calls stages uniformly.
        seed: MinHash seed.

    Returns (kept, rejected); a rejected row carries stage "dedup" and a reason naming the kept id.
    """
    if not rows:
        return [], []
    exact, near, _, sims = dedup_texts([_dedup_text(r, config.on) for r in rows], config.threshold,
                                       config.num_perm, config.shingle, seed, near=config.near)
    kept, rejected = [], []
    for i, row in enumerate(rows):
        if exact[i] != i:
            reason = f"exact duplicate: same {config.on} as {rows[exact[i]]['id']}"
        elif near is not None and near[i] != i:
            reason = f"near duplicate: {config.on} ~{sims[i]:.2f} similar to {rows[near[i]]['id']}"
        else:
            kept.append(row)
            continue
        rejected.append({**row, "stage": "dedup", "reason": reason})
    return kept, rejected
