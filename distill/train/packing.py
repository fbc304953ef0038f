"""Packed SFT batches: every pack one row of at most max_length tokens, every example attending only to itself.

trl packs prompt-completion examples into max_length blocks (best-fit decreasing) and
then collates them padding-free: the whole batch becomes ONE row of up to
batch_size * max_length tokens, told apart only by position ids. Flash attention's
varlen kernels read those and keep the examples apart. Without them (SDPA or eager
attention, e.g. every model on CPU) that row is one long sequence: the attention
cost grows with the square of batch_size * max_length, a model with a learnt position
table can overrun it, and a model that does not derive its mask from position ids
(BERT as a decoder) lets every example attend to the ones packed before it.

So on those attention kernels packs are collated as rows of their own (`collate_packs`:
[batch, longest pack] with position ids restarting at every example), and
`isolate_packed_examples` turns the padding mask into the block-diagonal causal mask
before the model sees it: each token attends to the earlier tokens of its own example.
"""

from __future__ import annotations

from typing import Any, Callable

# Attention kernels that keep packed examples apart from position ids alone (trl's padding-free rows).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/vllm-flash-attn3")


def needs_own_rows(model) -> bool:
    """Whether packs must be collated one per row (the model's attention cannot read packed position ids)."""
    return str(getattr(model.config, "_attn_implementation", "eager")) not in VARLEN_ATTENTION


def collate_packs(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A data collator for trl's packed (or plain) tokenized examples, one pack per row.

    Each example has "input_ids", "labels" (-100 outside the completions) and, when packed,
    "seq_lengths" (the lengths of the examples in the pack). Returns input_ids, labels,
    attention_mask (1 on real tokens) and position_ids, all [batch, longest pack]; the label of
    every example's first token is -100, so no example is trained to continue the one before it.
    """
    import torch

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        positions = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e.get("labels", e["input_ids"]))
            mask[row, :n] = 1
            start = 0
            for length in e.get("seq_lengths") or [n]:
                positions[row, start:start + length] = torch.arange(length)
                labels[row, start] = -100
                start += length
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}

    return collate


def packed_attention_mask(attention_mask, position_ids, dtype):
    """[batch, 1, n, n] mask letting each real token attend to the earlier tokens of its own example
    (examples start where the position id is 0); padding attends only to itself, so no row is empty.

    dtype None gives a boolean mask (SDPA); a float dtype an additive one (0 or the dtype's minimum, eager).
    """
    import torch

    n = position_ids.shape[1]
    segment = (position_ids == 0).cumsum(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=position_ids.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def isolate_packed_examples(model):
    """Register a forward pre-hook on `model` that replaces a 2-D padding mask, when position ids come with
    it, by `packed_attention_mask`; returns the hook's handle. Generation (a cache) is left alone.

    A 4-D mask is passed to the attention kernel as it is (transformers' documented custom-mask path),
    which is how BERT-style decoders, whose own causal mask ignores position ids, keep examples apart.
    """
    boolean = getattr(model.config, "_attn_implementation", "eager") == "sdpa"

    def hook(module, args, kwargs):
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is None or positions is None or mask.dim() != 2 or kwargs.get("past_key_values") is not None:
            return None
        dtype = None if boolean else next(module.parameters()).dtype
        return args, {**kwargs, "attention_mask": packed_attention_mask(mask, positions, dtype)}

    return model.register_forward_pre_hook(hook, with_kwargs=True)
