"""Stage 1, generate: ask the teacher, keep everything it says.

In: task rows `{"id", "messages", ...}` (see `distill.data.load_task_rows`).
Out: one teacher record per (id, sample), in input order:
`{"id", "sample", "status": "done"|"failed", "error", "response", "finish_reason",
"truncated", "logprobs" (OpenAI `choices[0].logprobs.content` or None), "usage",
"cost_usd", "latency_s", "attempts", "cached", "model", "messages", "params"}`.

- `generation`: plan, cache lookup, online or batch run, summary (`generate`).
- `client`, `cache`, `batch`, `ratelimit`: the request side.
- `labels`: the label set in the prompt (placeholder or appendix, descriptions, few-shot turns) and
  answers mapped back to labels as a person would read them (`map_answer`).
- `structured`: structured-output request fields (json_schema enum, vLLM choice) and the probe that
  picks them and proves the endpoint answers.
- `reask`: one corrective re-ask for answers that name no label.
- `soft_labels`: the label distribution a classification answer carries, read over the labels' trie.
- `server`, `server_batches`: `distill teacher serve`, a local OpenAI-compatible teacher.
- `server_guard`: what both servers (this one and `distill serve`) put first: the key a command
  requires (open only on loopback, when asked), the Bearer check, the body-size limits.
"""
