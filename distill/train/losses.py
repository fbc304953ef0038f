"""Distillation losses as pure tensor functions (no model, no trainer state).

Direction: both losses use the standard Hinton direction KL(teacher_T || student_T)
= sum_k p_teacher_T(k) * (log p_teacher_T(k) - log p_student_T(k)), the forward KL
used by torchtune's `ForwardKLLoss` and TRL's generalized JSD at beta=0. It is
mode-covering: the student is pushed to put mass wherever the teacher does, which
is what carries the teacher's "dark knowledge" about near-miss labels.

The KL term is multiplied by T^2 so its gradient magnitude stays comparable to the
hard-label cross-entropy as T changes (Hinton et al., 2015, section 2).

torch is imported inside the functions so that importing distill stays cheap.
"""

from __future__ import annotations


def soft_label_kd_loss(student_logits, teacher_probs, hard_labels, temperature: float, alpha: float,
                       weights=None):
    """Per-example KD loss for a classifier, averaged over the batch.

    loss_i = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, hard_label_i)

    The teacher arrives as probabilities (from its logprobs), so it is softened as
    p_T proportional to p^(1/T), which is exactly softmax(log p / T): the same as
    dividing teacher logits by T.

    Rows whose teacher distribution is missing (all zeros, e.g. a gold example
    without teacher logprobs) have nothing to distil: their loss is the plain
    cross-entropy, whatever alpha is.

    Args:
        student_logits: float tensor [B, K], raw student logits.
        teacher_probs: float tensor [B, K], teacher probabilities over the same K labels
            (rows sum to 1, or to 0 for "no soft label").
        hard_labels: long tensor [B], index of the target label.
        temperature: T > 0, applied to both distributions in the KL term.
        alpha: weight of the KD term in [0, 1]; 1 - alpha weighs the cross-entropy.
        weights: optional float tensor [B] of example weights; the result is the
            weighted mean sum(w_i * loss_i) / sum(w_i).

    Returns:
        A scalar tensor.
    """
    import torch
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probs "
                         f"{tuple(teacher_probs.shape)} must have the same shape")
    student_logits = student_logits.float()
    teacher_probs = teacher_probs.to(student_logits)
    ce = F.cross_entropy(student_logits, hard_labels, reduction="none")

    has_soft = teacher_probs.sum(dim=-1) > 0
    # log(0) for labels the teacher rules out entirely; clamped so 0 * log 0 stays 0 and
    # rows without a distribution do not produce NaN before they are masked out.
    teacher_log = torch.log(teacher_probs.clamp_min(1e-30))
    teacher_log_t = F.log_softmax(teacher_log / temperature, dim=-1)
    student_log_t = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher_log_t.exp() * (teacher_log_t - student_log_t)).sum(dim=-1)
    kd = (temperature ** 2) * kl

    per_example = torch.where(has_soft, alpha * kd + (1.0 - alpha) * ce, ce)
    if weights is None:
        return per_example.mean()
    weights = weights.to(per_example)
    return (per_example * weights).sum() / weights.sum().clamp_min(1e-12)


def token_kd_loss(student_logits, teacher_logits, mask, temperature: float):
    """Token-level KD for causal LMs sharing one tokenizer, averaged over masked-in tokens.

    loss = T^2 * mean over positions with mask=1 of KL(teacher_T || student_T), the sum
    running over the vocabulary. Callers pass logits already aligned to the tokens they
    predict (i.e. shifted), and a mask that selects completion tokens only.

    Args:
        student_logits: float tensor [B, L, V].
        teacher_logits: float tensor [B, L, V] from the teacher on the same input ids.
        mask: bool/int tensor [B, L]; 1 where the position counts.
        temperature: T > 0.

    Returns:
        A scalar tensor (0 when the mask selects nothing, still attached to the graph).
    """
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (shared tokenizer)")
    student_log_t = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_t = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    kl = (teacher_log_t.exp() * (teacher_log_t - student_log_t)).sum(dim=-1)
    mask = mask.to(kl.dtype)
    return (temperature ** 2) * (kl * mask).sum() / mask.sum().clamp_min(1.0)
