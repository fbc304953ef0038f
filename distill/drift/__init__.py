"""Stage 5b, drift: decide from production traffic when to re-distil.

In: the traffic/shadow log (with late gold labels from `distill feedback`), a random
teacher-labelled sample of recent traffic, the champion's evaluated metrics, and the
static holdout for the regression check.
Out: one result per sensor `{"sensor", "fired", "status", "value", "test", "p_value", "n", ...}`
(stats holds the tests; history the signals over time); the drift-watch flow turns a
fired sensor into a Prefect event.
"""
