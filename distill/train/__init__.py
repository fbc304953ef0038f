"""Stage 3, train: the student learns from the training rows.

In: training rows (see `distill.filter`), the label set, the `TrainConfig` of one mode.
Out: an output directory with `student/` (servable safetensors), `checkpoints/`,
`history.json` and `training_curves.png`, and a training summary dict.

- `classifier`: soft-label KD of an encoder classifier (mode `classifier_kd`).
- `lm`: LoRA or full SFT of a causal LM, and token-level logit KD (modes `sft`, `logit_kd`).
- `losses`: the pure loss functions; `trainer`: what both share.
"""
