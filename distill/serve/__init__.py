"""Stage 5a, serve: the champion student behind an OpenAI-compatible API.

In: a registry champion (and challenger), a `ServeConfig`.
Out: answers over HTTP, and one traffic/shadow log row per request (`shadow.ShadowLog`).

- `app`: the classifier server with canary, teacher fallback and shadow modes.
- `generative`: the same modes for a causal-LM student (fallback on the mean token logprob).
- `canary`: which requests the challenger answers.
- `registry`: champion / challengers per task, promotion with reasons.
- `shadow`: the traffic log and its review.
"""
