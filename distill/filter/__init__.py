"""Stage 2, filter: keep only the teacher answers worth learning from, then mix.

In: task rows and teacher records, joined by `rows.build_candidates` into candidate
rows `{"id", "sample", "text", "gold", "messages", "response", "finish_reason",
"truncated", "logprobs", "label", "soft_labels", "entropy"}`.
Each stage is `(rows, config, task) -> (kept, rejected)`, in this order:
`heuristics`, `consistency`, `entropy`, `dedup`, `grader`, `spotcheck`.
Out (`mix.mix_dataset`): training rows `{"id", "text", "messages", "target",
"soft_labels", "source": "teacher"|"traffic"|"real", "weight", "split": "train"|"validation"}`.
"""
