"""Stage 5a, serve: the champion student behind an OpenAI-compatible API.

In: a registry champion (and challenger), a `ServeConfig`.
Out: answers over HTTP, and one traffic/shadow log row per request (`shadow.ShadowLog`).

- `app`: the server with canary, teacher fallback and shadow modes.
- `registry`: champion / challengers per task, promotion with reasons.
- `shadow`: the traffic log and its review.
"""
