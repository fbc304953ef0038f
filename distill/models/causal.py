"""A causal-LM student answering chats: batched greedy answers for evaluation, token streams for serving.

A student directory is a full model, a merged one, or a LoRA adapter (loaded on
its base, as `adapter_config.json` names it). Answers carry OpenAI-style
per-token logprobs, the mean token entropy (the entropy-collapse signal), and the
answer's log-probability under a grid of temperatures applied to every step's
logits, from which evaluation fits the student's temperature: greedy decoding
picks the same tokens at every temperature, so only the confidence changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from distill.config import ConfigError

# Temperatures the sequence confidence is computed at (fitting picks one; 1.0 is the model as trained).
TEMPERATURE_GRID = (0.25, 0.35, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)


def is_causal_lm_dir(path: str | Path) -> bool:
    """Whether a directory holds a causal LM (or a LoRA adapter of one) rather than a classifier."""
    import json

    path = Path(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return json.loads((path / "adapter_config.json").read_text()).get("task_type") == "CAUSAL_LM"
    if not (path / "config.json").exists():
        return False
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class GenerativeStudent:
    """A causal LM directory (full model, merged, or a LoRA adapter) answering chats."""

    def __init__(self, path: str | Path, max_new_tokens: int = 64, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        device = device or default_device()
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            from peft import AutoPeftModelForCausalLM

            self.model = AutoPeftModelForCausalLM.from_pretrained(path)
        elif (path / "config.json").exists():
            self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        else:
            raise ConfigError(f"{path}: not a model directory (no config.json or adapter_config.json)")
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.device, self.path = device, path
        self._torch = torch

    def _prompts(self, chats: list[list[dict[str, str]]]):
        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def answer(self, chats: list[list[dict[str, str]]], batch_size: int = 16) -> list[dict[str, Any]]:
        """Greedy answers: [{"text", "logprobs" (OpenAI-style content list), "first_entropy",
        "mean_entropy", "logprob_at" (the answer's log-probability at each TEMPERATURE_GRID entry)}]."""
        torch, tok = self._torch, self.tokenizer
        out: list[dict[str, Any]] = []
        eos = tok.eos_token_id
        temps = torch.tensor(TEMPERATURE_GRID, device=self.device)
        with torch.inference_mode():
            for i in range(0, len(chats), batch_size):
                enc = self._prompts(chats[i:i + batch_size])
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=tok.pad_token_id, eos_token_id=eos)
                new = gen.sequences[:, enc["input_ids"].shape[1]:]
                logits = torch.stack(gen.logits, dim=1).float()  # [batch, steps, vocab], raw
                logp = logits.log_softmax(-1)
                entropy = -(logp.exp() * logp.clamp(min=-1e4)).sum(-1)  # [batch, steps]
                for b in range(new.shape[0]):
                    ids = new[b].tolist()
                    end = ids.index(eos) + 1 if eos in ids else len(ids)
                    steps = torch.arange(end, device=self.device)
                    chosen = new[b, :end]
                    # log p_T(answer) = sum over steps of log_softmax(z / T)[token], for every T at once
                    scaled = (logits[b, :end].unsqueeze(0) / temps[:, None, None]).log_softmax(-1)
                    at = scaled[:, steps, chosen].sum(-1)
                    out.append({"text": tok.decode(ids[:end], skip_special_tokens=True).strip(),
                                "logprobs": [{"token": tok.decode([t]), "logprob": float(logp[b, j, t])}
                                             for j, t in enumerate(ids[:end])],
                                "first_entropy": float(entropy[b, 0]),
                                "mean_entropy": float(entropy[b, :end].mean()),
                                "logprob_at": [float(x) for x in at]})
        return out

    def stream(self, chat: list[dict[str, str]], max_new_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None) -> Iterator[tuple[int, str, float]]:
        """(token id, text it adds, logprob) as each token is decoded; stops after EOS (not yielded) or
        max_new_tokens. temperature 0 is greedy; above it, sampling from the softened distribution.
        The added text is the growth of the whole answer's decoding, so the pieces join to exactly
        what decoding the answer at once gives, whatever the tokenizer's spacing rules."""
        torch, tok = self._torch, self.tokenizer
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        enc = self._prompts([chat])
        ids, mask, past = enc["input_ids"], enc["attention_mask"], None
        answer, shown = [], ""
        with torch.inference_mode():
            for _ in range(max_new_tokens or self.max_new_tokens):
                out = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logp = out.logits[0, -1].float().log_softmax(-1)
                if temperature > 0:
                    probs = (logp / temperature).softmax(-1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(logp.argmax())
                if token == tok.eos_token_id:
                    return
                answer.append(token)
                text = tok.decode(answer, skip_special_tokens=True).strip()
                yield token, text[len(shown):], float(logp[token])
                shown = text
                ids = torch.tensor([[token]], device=self.device)
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
