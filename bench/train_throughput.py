"""LoRA SFT throughput (tokens/s) and MFU through distill's own `train_sft`, on random Qwen2-style models.

On a GPU: ~0.5B, ~1.5B and ~7B configurations (Qwen2-0.5B/1.5B/7B shapes), sequence
length 2048, bf16, gradient checkpointing, with and without packing. On CPU: one tiny
configuration, tokens/s only. Weights are random and nothing is downloaded: each
model is saved to a temporary directory and trained by `distill.train.lm.train_sft`
from there, so the timed path is the product's: prompt-completion rows rendered with
the tokenizer's chat template, completion-only loss, packing, LoRA, the Trainer.

Each configuration trains one epoch over its rows; the steps after warm-up are timed
and credited with their share of the epoch's real tokens (the rows are shuffled, so
every step sees the same mix of lengths). tokens/s counts real (non-padding) tokens.
MFU = achieved FLOP/s / the GPU's dense bf16 peak. FLOPs are summed per example from
its real length n: n * (4 * N_matmul + 6 * N_lora) + 12 * layers * hidden * n^2
(forward + input gradients for frozen LoRA base weights, full gradients for the
adapters; attention scores and values in the PaLM appendix B convention, over the
example's own n tokens, never the padded or packed sequence length). N_matmul counts
the weights of every matmul, the output layer included and the embedding lookup excluded.

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
    """A word-level tokenizer over placeholder words t3..tN, with chat markers and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + [f"t{i}" for i in range(len(specials), vocab_size)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": specials[3:]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return tok


def random_rows(vocab_size: int, seq_len: int, n: int, seed: int) -> list[dict]:
    """distill training rows (production chat + teacher completion) with lengths spread over
    [seq_len/16, seq_len], as real SFT data is; a quarter of each example is the completion."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"t{rng.randrange(8, vocab_size)}" for _ in range(max(k, 1)))

    rows = []
    for i in range(n):
        total = rng.randint(seq_len // 16, seq_len - 12)  # room for the chat markers
        answer = max(total // 4, 1)
        rows.append({"id": str(i), "split": "train", "target": words(answer),
                     "messages": [{"role": "system", "content": words(4)},
                                  {"role": "user", "content": words(total - answer - 4)}]})
    return rows


def example_lengths(rows: list[dict], tok, seq_len: int) -> list[int]:
    """Each example's real token count as the trainer sees it: chat template, completion, truncation."""
    lengths = []
    for r in rows:
        chat = r["messages"] + [{"role": "assistant", "content": r["target"]}]
        ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        lengths.append(min(len(ids), seq_len))
    return lengths


def matmul_weights(model) -> tuple[int, int]:
    """(weights of the frozen matmuls, output layer included; weights of the LoRA adapters)."""
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
    return n_matmul, n_lora


def training_flops(lengths: list[int], n_matmul: int, n_lora: int, layers: int, hidden: int) -> float:
    """FLOPs of one epoch, per example from its real length (see the module docstring)."""
    return float(sum(n * (4 * n_matmul + 6 * n_lora) + 12 * layers * hidden * n * n for n in lengths))


def clock_callback(warmup: int):
    """A TrainerCallback timing the steps after `warmup`; it also keeps the trained model."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        start, elapsed, timed_steps, total_steps, model = None, 0.0, 0, 0, None

        def _sync(self):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now = time.perf_counter()
            self.total_steps = state.max_steps
            if state.global_step == warmup:
                self.start = now
            elif self.start is not None:
                self.elapsed, self.timed_steps = now - self.start, state.global_step - warmup

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.model = model

    return Clock()


def run_one(size: str, packing: bool, seq_len: int, steps: int, warmup: int, batch: int, gpu: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from distill.config import SFTTrain
    from distill.train.lm import train_sft

    cfg = Qwen2Config(max_position_embeddings=max(seq_len, 4096), **CONFIGS[size])
    dtype = torch.bfloat16 if gpu else torch.float32
    tok = tokenizer_for(cfg.vocab_size)
    # An epoch of about `steps` optimiser steps (packing fits about two examples in a sequence).
    rows = random_rows(cfg.vocab_size, seq_len, n=batch * steps * (2 if packing else 1), seed=0)
    lengths = example_lengths(rows, tok, seq_len)
    clock = clock_callback(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cuda" if gpu else "cpu"):  # random init directly on the device: fast, no host copy
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        del model
        train = SFTTrain(student_model=f"{tmp}/model", lora={"enabled": True, "r": 16, "alpha": 32,
                            "dropout": 0.0}, packing=packing, max_length=seq_len, batch_size=batch, epochs=1,
                            learning_rate=1e-4, bf16=gpu, gradient_checkpointing=gpu, device="cuda" if gpu else "cpu",
                            eval_steps=10_000, checkpoint_steps=10_000, logging_steps=10_000,
                            early_stopping_patience=None, resume=False)
        train_sft(rows, train, f"{tmp}/run", progress=False, callbacks=[clock])
        n_matmul, n_lora = matmul_weights(clock.model)
    share = clock.timed_steps / clock.total_steps if clock.total_steps else 0.0
    flops = training_flops(lengths, n_matmul, n_lora, cfg.num_hidden_layers, cfg.hidden_size) * share
    tokens = sum(lengths) * share
    if gpu:
        torch.cuda.empty_cache()
    ok = clock.elapsed > 0
    return {"size": size, "packing": packing, "tokens_per_s": tokens / clock.elapsed if ok else float("nan"),
            "flops_per_s": flops / clock.elapsed if ok else float("nan"), "steps": clock.total_steps}


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
            mfu = r["flops_per_s"] / peak if peak else None
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
