"""LoRA SFT throughput (tokens/s) and MFU on randomly initialised Qwen2-style models.

On a GPU: ~0.5B, ~1.5B and ~7B configurations (Qwen2-0.5B/1.5B/7B shapes), sequence
length 2048, bf16, gradient checkpointing, with and without packing, through the same
trl SFTTrainer + peft path as `distill.train.lm.train_sft`. On CPU: one tiny
configuration, tokens/s only. Weights are random and nothing is downloaded.

tokens/s counts real (non-padding) tokens, so padding waste shows up as lower
throughput without packing. MFU = achieved FLOP/s / the GPU's dense bf16 peak, with
FLOPs per token = 4 * N_matmul (forward + input gradients; frozen LoRA base weights get
no weight gradient) + 6 * N_lora + 12 * layers * hidden * seq (attention scores and
values, PaLM appendix B convention). N_matmul counts the weights of every matmul,
the output layer included and the embedding lookup excluded.

Usage: python bench/train_throughput.py [--steps 20] [--warmup 5] [--sizes 0.5b,1.5b,7b]
Last line: device=<cpu|gpu name> tokens_per_s=<float> mfu=<float|na> for the largest config that ran.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from distill.offline import apply_offline_env

apply_offline_env()

# Qwen2 shapes (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings).
CONFIGS = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=2000, tie_word_embeddings=True),
}
GPU_BATCH = {"0.5b": 8, "1.5b": 4, "7b": 2}

# Dense bf16 tensor-core peak FLOP/s (no sparsity), by device-name substring, most specific first.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
             ("RTX 4090", 165e12), ("A6000", 155e12)]


def peak_flops(name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key in name:
            return peak
    return None


def tokenizer_for(vocab_size: int):
    """A word-level tokenizer over placeholder tokens: the trainer needs one, the data is already ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2")),
                                  pad_token="t0", eos_token="t1", unk_token="t2")
    return tok


def random_dataset(vocab_size: int, seq_len: int, n: int, seed: int):
    """Sequences with lengths spread over [seq_len/16, seq_len], as real SFT data is."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [[rng.randrange(3, vocab_size) for _ in range(rng.randint(seq_len // 16, seq_len))] for _ in range(n)]
    return Dataset.from_dict({"input_ids": rows})


def flops_per_token(model, seq_len: int) -> float:
    import torch

    cfg = model.config
    n_matmul = n_lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if "lora_" in name:
                n_lora += module.weight.numel()
            else:
                n_matmul += module.weight.numel()
    if cfg.tie_word_embeddings:  # the output layer is the embedding matrix, used as a matmul
        n_matmul += cfg.vocab_size * cfg.hidden_size
    return 4 * n_matmul + 6 * n_lora + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


class _Clock:
    """TrainerCallback timing steps after warm-up, with the real tokens seen in that window."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = None
        self.tokens0 = 0
        self.elapsed = 0.0
        self.tokens = 0

    def __getattr__(self, name):
        return lambda *a, **k: None

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if state.global_step == self.warmup:
            self.start, self.tokens0 = now, state.num_input_tokens_seen
        elif self.start is not None:
            self.elapsed = now - self.start
            self.tokens = state.num_input_tokens_seen - self.tokens0


def run_one(size: str, packing: bool, seq_len: int, steps: int, warmup: int, batch: int, gpu: bool) -> dict:
    import torch
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl import SFTConfig, SFTTrainer

    cfg = Qwen2Config(max_position_embeddings=max(seq_len, 4096), **CONFIGS[size])
    dtype = torch.bfloat16 if gpu else torch.float32
    attn = "flash_attention_2" if gpu and _has_flash_attn() else "sdpa"
    with torch.device("cuda" if gpu else "cpu"):  # random init directly on the device: fast, no host copy
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    tok = tokenizer_for(cfg.vocab_size)
    data = random_dataset(cfg.vocab_size, seq_len, n=batch * (steps + 2) * (4 if packing else 1), seed=0)
    clock = _Clock(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                         max_length=seq_len, packing=packing, bf16=gpu, use_cpu=not gpu,
                         activation_checkpointing=gpu,
                         activation_checkpointing_kwargs={"use_reentrant": False} if gpu else None,
                         include_num_input_tokens_seen="non_padding", save_strategy="no", report_to="none",
                         logging_steps=steps, disable_tqdm=True, dataloader_num_workers=2 if gpu else 0)
        peft = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.0,
                          target_modules="all-linear")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                             callbacks=[clock])
        trainer.train()
        fpt = flops_per_token(trainer.model, seq_len)
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    tps = clock.tokens / clock.elapsed if clock.elapsed else float("nan")
    return {"size": size, "packing": packing, "tokens_per_s": tps, "flops_per_token": fpt}


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="Optimiser steps per run (timed after warm-up).")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed first steps.")
    parser.add_argument("--sizes", default=None, help="Comma list of 0.5b,1.5b,7b (GPU) or tiny (CPU).")
    parser.add_argument("--seq-len", type=int, default=None, help="Sequence length (2048 on GPU, 256 on CPU).")
    opts = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    sizes = (opts.sizes or ("0.5b,1.5b,7b" if gpu else "tiny")).split(",")
    seq_len = opts.seq_len or (2048 if gpu else 256)
    peak = peak_flops(device) if gpu else None
    last = None
    for size in sizes:
        for packing in (False, True):
            try:
                r = run_one(size, packing, seq_len, opts.steps, opts.warmup, GPU_BATCH.get(size, 4), gpu)
            except torch.OutOfMemoryError:
                print(f"size={size} packing={packing} out of memory, skipped", flush=True)
                torch.cuda.empty_cache()
                continue
            mfu = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
            print(f"size={size} packing={packing} seq_len={seq_len} tokens_per_s={r['tokens_per_s']:.1f} "
                  f"mfu={'na' if mfu is None else f'{mfu:.4f}'}", flush=True)
            if packing or last is None or last[0] != size:
                last = (size, r["tokens_per_s"], mfu)
    if last is None:
        raise SystemExit("no configuration ran")
    _, tps, mfu = last
    print(f"device={device.replace(' ', '_')} tokens_per_s={tps:.1f} mfu={'na' if mfu is None else f'{mfu:.4f}'}")


if __name__ == "__main__":
    main()
