"""Compact teacher signals: per-token top-k logprobs as small arrays instead of the provider's JSON.

An OpenAI `logprobs.content` entry spells every alternative as a JSON object with its token, logprob
and UTF-8 bytes: about 1.7 KB per answer token at top_logprobs 20, which makes tens of GB at a
million prompts. A record keeps instead, under "topk":

    {"v": 1, "n": tokens, "k": alternatives kept per token (the widest position's),
     "data": base85(zlib(ids uint16[n, k+1] ++ logprobs float16[n, k+1] ++ NUL-joined token strings))}

Column 0 of each position is the chosen token, columns 1..k its alternatives in the provider's order
(the chosen token is not repeated among them); an id of 65535 pads a position with fewer
alternatives. Each distinct token string is stored once per record, and ids index into that list. float16 keeps a
logprob to about 3 significant digits (an error under 0.001 in probability), which is below what
the top-k truncation itself loses. Measured by bench/scale.py: well under 200 bytes per token at top-20.

The raw response text is always kept; `generation.keep_raw_logprobs` also keeps the provider's list
under "logprobs" for audit. Readers call `token_logprobs(record)`, which answers the OpenAI-style
list from either form (records written before "topk" existed hold only "logprobs").
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

PAD = 0xFFFF


def compact(content: list[dict] | None) -> dict | None:
    """The "topk" form of an OpenAI `logprobs.content` list (None for None or an empty list)."""
    import numpy as np

    if not content:
        return None
    k = max(sum(1 for a in (tok.get("top_logprobs") or []) if a.get("token") != tok.get("token")) for tok in content)
    vocab: dict[str, int] = {}
    ids = np.full((len(content), k + 1), PAD, dtype="<u2")
    lps = np.zeros((len(content), k + 1), dtype="<f2")
    for i, tok in enumerate(content):
        chosen = str(tok.get("token") or "")
        ids[i, 0] = vocab.setdefault(chosen, len(vocab))
        lps[i, 0] = float(tok.get("logprob") or 0.0)
        j = 1
        for alt in tok.get("top_logprobs") or []:
            t = str(alt.get("token") or "")
            if t == chosen:
                continue
            ids[i, j] = vocab.setdefault(t, len(vocab))
            lps[i, j] = float(alt.get("logprob") or 0.0)
            j += 1
    words = "\0".join(vocab)
    if len(vocab) >= PAD or "\0" in "".join(vocab):
        return None  # a 65,535-token vocabulary, or a NUL inside a token: keep the raw list (compact_fields)
    data = zlib.compress(ids.tobytes() + lps.tobytes() + words.encode("utf-8"), 9)
    return {"v": 1, "n": len(content), "k": k, "data": base64.b85encode(data).decode("ascii")}


def expand(topk: dict) -> list[dict]:
    """The OpenAI-style content list back from the "topk" form (logprobs rounded to float16)."""
    import numpy as np

    n, width = int(topk["n"]), int(topk["k"]) + 1
    raw = zlib.decompress(base64.b85decode(topk["data"]))
    cells = n * width
    ids = np.frombuffer(raw[:2 * cells], dtype="<u2").reshape(n, width)
    lps = np.frombuffer(raw[2 * cells:4 * cells], dtype="<f2").reshape(n, width).astype(float)
    vocab = raw[4 * cells:].decode("utf-8").split("\0")
    out = []
    for i in range(n):
        chosen = {"token": vocab[ids[i, 0]], "logprob": float(lps[i, 0])}
        alts = [chosen] + [{"token": vocab[ids[i, j]], "logprob": float(lps[i, j])}
                           for j in range(1, width) if ids[i, j] != PAD]
        out.append({**chosen, "top_logprobs": sorted(alts, key=lambda a: -a["logprob"])})
    return out


def compact_fields(fields: dict[str, Any], keep_raw: bool) -> dict[str, Any]:
    """A parsed response as it is stored: "topk" from its logprobs, the raw list only when `keep_raw`."""
    content = fields.get("logprobs")
    topk = compact(content) if content else None
    fields["topk"] = topk
    if topk is not None and not keep_raw:
        fields["logprobs"] = None
    return fields


def token_logprobs(record: dict[str, Any]) -> list[dict] | None:
    """The record's per-token logprobs as an OpenAI-style content list, from "logprobs" or "topk"."""
    if record.get("logprobs"):
        return record["logprobs"]
    topk = record.get("topk")
    return expand(topk) if isinstance(topk, dict) else None
