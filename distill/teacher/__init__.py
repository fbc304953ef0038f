"""Stage 1, generate: ask the teacher, keep everything it says.

In: task rows `{"id", "messages", ...}` (see `distill.data.load_task_rows`).
Out: one teacher record per (id, sample), in input order:
`{"id", "sample", "status": "done"|"failed", "error", "response", "finish_reason",
"truncated", "logprobs" (OpenAI `choices[0].logprobs.content` or None), "usage",
"cost_usd", "latency_s", "attempts", "cached", "model", "messages", "params"}`.

- `generation`: plan, cache lookup, online or batch run, summary (`generate`).
- `client`, `cache`, `batch`, `ratelimit`: the request side.
- `soft_labels`: the label distribution a classification answer carries.
- `server`, `server_batches`: `distill teacher serve`, a local OpenAI-compatible teacher.
"""
