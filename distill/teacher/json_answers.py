"""A classifier teacher's answer written as a one-field JSON object, for generative students.

`distill teacher serve --json-field intent` answers `{"intent": "card_arrival"}`
instead of the bare label, so a causal-LM student can be distilled from the demo
teacher exactly as from an LLM asked for structured output. The logprobs follow
the classifier convention of distill/teacher/soft_labels.py, each label one
"token": the fixed JSON around it is certain (logprob 0) and the label token
carries the teacher's label distribution, so the answer's sequence probability
is the teacher's probability of its label.
"""

from __future__ import annotations

import json

import numpy as np

from distill.chat import token_logprob


def json_answer(field: str, labels: list[str], logprobs: np.ndarray, with_logprobs: bool,
                top_logprobs: int) -> tuple[str, dict | None]:
    """(content, OpenAI logprobs object or None) for the argmax label written as {field: label}.

    Args:
        field: the JSON key, e.g. "intent".
        labels: the teacher's label set, in the order of `logprobs`.
        logprobs: log-probabilities over `labels`.
        with_logprobs: whether the request asked for logprobs.
        top_logprobs: alternatives per token (labels at the label token).
    """
    order = np.argsort(-logprobs, kind="stable")
    label = labels[order[0]]
    content = json.dumps({field: label})
    head, tail = content.split(json.dumps(label))
    head, tail = head + '"', '"' + tail
    if not with_logprobs:
        return content, None
    k = min(top_logprobs, len(labels))

    def certain(text: str) -> dict:
        return {**token_logprob(text, 0.0), "top_logprobs": [token_logprob(text, 0.0)] if k else []}

    middle = {**token_logprob(label, logprobs[order[0]]),
              "top_logprobs": [token_logprob(labels[j], logprobs[j]) for j in order[:k]]}
    return content, {"content": [certain(head), middle, certain(tail)], "refusal": None}
