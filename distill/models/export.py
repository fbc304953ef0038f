"""A causal-LM student exported for serving at scale: a vLLM LoRA adapter, or a speculative draft.

`export_vllm_lora` writes the directory `vllm serve BASE --enable-lora --lora-modules
NAME=DIR` loads: `adapter_config.json` (PEFT's, with `base_model_name_or_path` set to
the base vLLM serves) and `adapter_model.safetensors` with only the LoRA A/B matrices,
keyed `base_model.model.<module>.lora_{A,B}.weight` under the module names of the base
model. What vLLM cannot load is refused here, before a deployment finds out: adapter
biases, DoRA, `modules_to_save` (a trained copy of whole modules; merge instead), target
modules that are not linear layers of the base.

`export_draft` writes the student as a full model (a LoRA adapter merged into its base)
for speculative decoding with a teacher that shares its tokenizer, after checking that
they encode alike: a draft with another vocabulary proposes token ids that mean
something else to the teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill.config import ConfigError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Text a tokenizer comparison encodes: words, digits, punctuation, JSON, non-ASCII.
PROBE_TEXTS = ("my card is lost", "Refund pending since 3 days?", '{"intent": "card_arrival"}',
               "exchange rate fee, please!", "café – naïve ünïcode ✓")


def _read_adapter(adapter_dir: Path) -> dict[str, Any]:
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).exists()]
    if missing:
        raise ConfigError(f"{adapter_dir}: not a LoRA adapter directory (missing {', '.join(missing)})")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if cfg.get("task_type") != "CAUSAL_LM":
        problems.append(f"task_type is {cfg.get('task_type')!r}, not 'CAUSAL_LM'")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg['bias']!r}: vLLM loads adapters without biases (train with bias 'none')")
    if cfg.get("use_dora"):
        problems.append("use_dora: vLLM does not serve DoRA adapters; merge the adapter instead")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: vLLM loads only LoRA A/B weights; "
                        "merge the adapter instead")
    if problems:
        raise ConfigError(f"{adapter_dir / 'adapter_config.json'}: " + "; ".join(problems))
    return cfg


def _lora_modules(weights: dict, adapter_dir: Path) -> dict[str, dict[str, Any]]:
    """{module path in the base: {"A", "B"}} from PEFT's saved keys."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"{adapter_dir / 'adapter_model.safetensors'}: unexpected tensor {key} "
                              "(vLLM loads only base_model.model.<module>.lora_A/lora_B.weight)")
        module, _, part = key[len("base_model.model."):-len(".weight")].rpartition(".lora_")
        modules.setdefault(module, {})[part] = tensor
    return modules


def _check_against_base(modules: dict[str, dict[str, Any]], base_dir: Path, r: int) -> list[str]:
    """Every adapted module is a linear layer of the base with the adapter's shapes; their short names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):  # shapes only: no weights are read
        base = AutoModelForCausalLM.from_config(config)
    named = dict(base.named_modules())
    for module, ab in sorted(modules.items()):
        layer = named.get(module)
        if not isinstance(layer, torch.nn.Linear):
            raise ConfigError(f"adapter module {module} is not a linear layer of the base {base_dir}")
        want = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
        for part, shape in want.items():
            if part not in ab or tuple(ab[part].shape) != shape:
                got = tuple(ab[part].shape) if part in ab else None
                raise ConfigError(f"adapter module {module}: lora_{part} has shape {got}, the base needs {shape}")
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def export_vllm_lora(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                     base_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the LoRA adapter in the layout `vllm serve --enable-lora` loads.

    Args:
        adapter_dir: a PEFT LoRA adapter of a causal LM (what `train_sft` writes to `adapter/`).
        out_dir: the directory to write (created; must not hold another export).
        base_model: what vLLM serves as the base (a hub id or path), written as
            `base_model_name_or_path`; the adapter's own base when None.
        base_dir: a local copy of the base to check the adapter's module names and shapes
            against; the adapter's `base_model_name_or_path` when None.
    Returns:
        {"dir", "base_model", "target_modules", "r", "lora_alpha", "tensors", "command"}.
    """
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    cfg = _read_adapter(adapter_dir)
    base_dir = Path(base_dir or cfg.get("base_model_name_or_path") or "")
    if not (base_dir / "config.json").exists():
        raise ConfigError(f"{adapter_dir}: its base {str(base_dir)!r} is not a local model directory; "
                          "pass base_dir (--base-dir) to check the adapter against the base")
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    modules = _lora_modules(weights, adapter_dir)
    targets = _check_against_base(modules, base_dir, int(cfg["r"]))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: not empty; choose a new directory for the export")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = base_model or str(base_dir)
    # target_modules as the short module names vLLM matches; the resolved list, never "all-linear".
    exported = {**cfg, "base_model_name_or_path": name, "target_modules": targets, "inference_mode": True,
                "modules_to_save": None}
    tmp = out_dir / "adapter_model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps(exported, indent=2, sort_keys=True) + "\n")
    rank = int(cfg["r"])
    command = (f"vllm serve {name} --enable-lora --max-lora-rank {max(16, rank)} "
               f"--lora-modules student={out_dir}")
    return {"dir": str(out_dir), "base_model": name, "target_modules": targets, "r": rank,
            "lora_alpha": cfg.get("lora_alpha"), "tensors": len(weights), "command": command}


def same_tokenizer(a_dir: str | Path, b_dir: str | Path) -> str | None:
    """None when two model directories' tokenizers encode alike; otherwise what differs."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(a_dir), AutoTokenizer.from_pretrained(b_dir)
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    if a.get_vocab() != b.get_vocab():
        return "the vocabularies map tokens to different ids"
    for text in PROBE_TEXTS:
        if a(text)["input_ids"] != b(text)["input_ids"]:
            return f"they encode {text!r} differently"
    if (a.eos_token_id, a.bos_token_id) != (b.eos_token_id, b.bos_token_id):
        return "their BOS/EOS token ids differ"
    return None


def export_draft(student_dir: str | Path, out_dir: str | Path, teacher_dir: str | Path) -> dict[str, Any]:
    """Write the student as a speculative-decoding draft for an open-weights teacher with its tokenizer.

    Args:
        student_dir: the student (full, merged, or a LoRA adapter, which is merged here).
        out_dir: the directory to write (a full model and its tokenizer, safetensors).
        teacher_dir: the teacher's local model directory; its tokenizer must encode like the student's.
    Returns:
        {"dir", "parameters", "teacher_layers", "vllm_speculative_config"}.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    student_dir, out_dir, teacher_dir = Path(student_dir), Path(out_dir), Path(teacher_dir)
    diff = same_tokenizer(student_dir, teacher_dir)
    if diff is not None:
        raise ConfigError(f"{student_dir} cannot draft for {teacher_dir}: {diff}; speculative decoding needs "
                          "the teacher's tokenizer")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: not empty; choose a new directory for the export")
    if (student_dir / "adapter_config.json").exists() and not (student_dir / "config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(student_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(student_dir, use_safetensors=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(partial)
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    spec = {"model": str(out_dir), "num_speculative_tokens": 5}
    return {"dir": str(out_dir), "parameters": sum(p.numel() for p in model.parameters()),
            "teacher_layers": getattr(teacher_config, "num_hidden_layers", None),
            "vllm_speculative_config": json.dumps(spec)}
