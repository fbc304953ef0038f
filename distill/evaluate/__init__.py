"""Stage 4, evaluate: measure the student against gold and its teacher, then gate it.

In: the student directory, the gold holdout rows, the teacher records of the holdout.
Out: a metrics dict (written as `metrics.json`), plots, `gate.decide` -> {"ship", "checks"},
and `report.render_report` -> report.md.

- `classifier`, `generative`: one evaluation per task kind.
- `metrics`, `calibration`, `tail`, `robustness`, `latency`: its sections.
"""
