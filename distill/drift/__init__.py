"""Stage 5b, drift: decide from production traffic when to re-distil.

In: the traffic/shadow log, a reference holdout, the champion's metrics.
Out: one result per sensor `{"sensor", "fired", "value", "threshold", "detail"}`;
the drift-watch flow turns a fired sensor into a Prefect event.
"""
