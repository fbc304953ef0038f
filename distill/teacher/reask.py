"""One corrective re-ask for classification answers that name no label (`generation.reask`).

The re-ask continues the conversation: the original chat, the teacher's own answer,
then a user turn with the label list asking for exactly one of them. It is an
ordinary request, so it goes through the request cache (a resumed run is served
from it, never paid twice) and is charged to the run's ledger as "reask". An
answer is re-asked at most once: a re-ask's own answer is never re-asked.
"""

from __future__ import annotations

from typing import Any

from distill.config import GenerationConfig, TeacherConfig
from distill.teacher.generation import generate
from distill.teacher.labels import label_block, map_answer
from distill.teacher.soft_labels import with_label_dists


def reask_messages(record: dict[str, Any], labels: list[str]) -> list[dict[str, str]]:
    """The corrective conversation for one unmapped answer."""
    ask = ("That is not one of the labels. Answer with exactly one label from this list, and nothing else:\n"
           + label_block(labels))
    return [*record["messages"], {"role": "assistant", "content": record["response"]}, {"role": "user", "content": ask}]


def reask_unmapped(records: list[dict], labels: list[str], teacher: TeacherConfig, generation: GenerationConfig,
                   api_key: str | None = None, purpose: str = "reask") -> tuple[list[dict], dict]:
    """(records, summary): unmapped done answers re-asked once; a mapped re-ask answer replaces the original.

    Args:
        records: teacher records of one generation (done or failed).
        labels: the label set.
        teacher, generation: as for generate(); sampling is the same, one sample per re-ask.
        api_key: the teacher's key.
        purpose: what the spend is charged as in the run's ledger ("reask", "holdout-reask").

    A replaced record keeps the first answer in "first_response" and gets "reasked": True; its cost
    and usage include the re-ask. Records whose re-ask still names no label are left as they were.
    """
    todo = [(i, r) for i, r in enumerate(records) if r["status"] == "done" and not r.get("reasked")
            and map_answer(r.get("response"), labels) is None]
    if not todo:
        return records, {}
    asks = [{"id": f"{r['id']}#{r.get('sample', 0)}#reask", "messages": reask_messages(r, labels)} for _, r in todo]
    settings = generation.model_copy(update={"samples_per_prompt": 1})
    result = generate(asks, teacher, settings, api_key=api_key, purpose=purpose)
    out = list(records)
    for (i, rec), new in zip(todo, result.records):
        if new["status"] != "done" or map_answer(new.get("response"), labels) is None:
            continue
        usage = {k: rec["usage"][k] + new["usage"][k] for k in rec["usage"]}
        out[i] = {**rec, "response": new["response"], "logprobs": new["logprobs"], "topk": new.get("topk"),
                  "finish_reason": new["finish_reason"], "truncated": new["truncated"], "first_response":
                  rec["response"], "reasked": True, "usage": usage, "cost_usd": rec["cost_usd"] + new["cost_usd"]}
        if "label_dist" in rec:
            with_label_dists([out[i]], labels)  # the distribution of the new answer, not the old one
    return out, result.summary
