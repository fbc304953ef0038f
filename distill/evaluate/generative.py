"""The evaluation of a generative (causal LM) student: the same measures, read from generated answers.

A generative student has no class logits, so its confidence in an answer is the
probability of the generated tokens (`sequence`) and of the first token, the
one that decides a label in a fixed-format answer (`label_token`); both are
calibrated against exact-match correctness (see distill.calibration).
Correctness is exact match after trimming, lower-casing and collapsing
whitespace. No temperature is fitted: scaling a whole sequence's probability
by one scalar is not the classifier's well-posed problem, so ECE is reported as
measured.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError, EvaluateConfig
from distill.data import write_jsonl
from distill.evaluate import calibration, latency, metrics, robustness
from distill.evaluate.records import clean_json, first_records, messages_like
from distill.evaluate.tail import select_tail
from distill.httpserver import start_in_thread


def normalize(text: str | None) -> str | None:
    """The form answers are compared in: trimmed, lower-cased, single spaces."""
    return None if text is None else " ".join(text.strip().lower().split())


class GenerativeStudent:
    """A causal LM directory (full model, merged, or a LoRA adapter) answering chats greedily."""

    def __init__(self, path: str | Path, max_new_tokens: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
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
        self.device = device
        self._torch = torch

    def answer(self, chats: list[list[dict[str, str]]], batch_size: int = 16) -> list[dict[str, Any]]:
        """Greedy answers: [{"text", "logprobs" (OpenAI-style content list), "first_entropy"}]."""
        torch, tok = self._torch, self.tokenizer
        out: list[dict[str, Any]] = []
        eos = tok.eos_token_id
        with torch.inference_mode():
            for i in range(0, len(chats), batch_size):
                prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                           for c in chats[i:i + batch_size]]
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          output_scores=True, return_dict_in_generate=True,
                                          pad_token_id=tok.pad_token_id)
                new = gen.sequences[:, enc["input_ids"].shape[1]:]
                logp = torch.stack(gen.scores, dim=1).float().log_softmax(-1)  # [batch, steps, vocab]
                for b in range(new.shape[0]):
                    ids = new[b].tolist()
                    end = ids.index(eos) + 1 if eos in ids else len(ids)
                    content = [{"token": tok.decode([t]), "logprob": float(logp[b, j, t])}
                               for j, t in enumerate(ids[:end])]
                    p0 = logp[b, 0].exp()
                    out.append({"text": tok.decode(ids[:end], skip_special_tokens=True).strip(),
                                "logprobs": content,
                                "first_entropy": float(-(p0 * logp[b, 0].clamp(min=-1e4)).sum())})
        return out


def _minimal_app(student: GenerativeStudent):
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        a = student.answer([body.get("messages") or []])[0]
        return {"object": "chat.completion", "model": body.get("model", "student"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a["text"]},
                             "finish_reason": "stop"}]}

    return app


def evaluate_generative(student_dir: str | Path, holdout: list[dict], teacher_records: list[dict],
                        config: EvaluateConfig, out_dir: str | Path, teacher_url: str | None = None,
                        teacher_model: str | None = None, teacher_api_key: str | None = None,
                        teacher_price: tuple[float, float] = (0.0, 0.0), max_new_tokens: int = 32) -> dict:  # long: split into named steps is pending
    """Measure a generative student; same metric names as evaluate_classifier where they apply.

    Args:
        student_dir: causal LM directory (full, merged or LoRA adapter).
        holdout: gold task rows.
        teacher_records: the teacher's records for the holdout rows.
        config: the evaluate section (tail_path is not used here: it needs a label column).
        out_dir: where plots, tail.jsonl and robustness.jsonl go.
        teacher_url, teacher_model, teacher_api_key: the teacher endpoint, for its latency.
        teacher_price: (input, output) USD per 1M tokens.
        max_new_tokens: answer length cap.
    Returns:
        A JSON-safe metrics dict; "temperature" is None (not fitted), "ece" is the sequence ECE.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not holdout or any(r.get("gold") is None for r in holdout):
        raise ConfigError("task.test_path: evaluation needs a holdout whose every row has a gold answer")
    ood = robustness.load_ood(config.ood_path)
    student = GenerativeStudent(student_dir, max_new_tokens)
    answers = student.answer([r["messages"] for r in holdout])
    gold = [normalize(r["gold"]) for r in holdout]
    pred = [normalize(a["text"]) for a in answers]
    by_id = first_records(teacher_records)
    teacher_pred, teacher_conf = [], {}
    for r in holdout:
        rec = by_id.get(r["id"])
        done = rec is not None and rec.get("status") == "done"
        teacher_pred.append(normalize(rec.get("response")) if done else None)
        c = calibration.sequence_confidence(rec.get("logprobs")) if done else None
        if c is not None:
            teacher_conf[r["id"]] = c
    m: dict[str, Any] = {"n_holdout": len(holdout), "student_kind": "generative"}
    m["teacher_accuracy"] = metrics.accuracy(gold, teacher_pred)
    m["student_accuracy"] = metrics.accuracy(gold, pred)
    m["retention"] = m["student_accuracy"] / m["teacher_accuracy"] if m["teacher_accuracy"] else math.nan
    m["agreement"] = metrics.agreement(pred, teacher_pred)
    m["teacher_unanswered"] = sum(p is None for p in teacher_pred)

    n_bins = config.ece_bins
    plots = {}
    for mode in ("sequence", "label_token"):
        cal = calibration.generative_calibration(pred, gold, [a["logprobs"] for a in answers], n_bins, mode)
        m[f"ece_{mode}"], m[f"mce_{mode}"], m[f"brier_{mode}"] = cal["ece"], cal["mce"], cal["brier"]
        name = f"reliability_{mode}"
        calibration.reliability_diagram(cal["confidence"], cal["correct"], out_dir / f"{name}.png", n_bins,
                                        f"{mode.replace('_', '-')} probability")
        plots[name] = f"{name}.png"
    m.update(ece=m["ece_sequence"], ece_before=m["ece_sequence"], mce=m["mce_sequence"],
             brier=m["brier_sequence"], temperature=None, ece_bins=n_bins, plots=plots)
    m["output_entropy"] = float(np.mean([a["first_entropy"] for a in answers]))
    m["label_entropy"] = metrics.label_entropy(pred)

    tail = select_tail(holdout, teacher_conf, config.tail_size)
    position = {r["id"]: i for i, r in enumerate(holdout)}
    rows = [{"id": r["id"], "reason": why, "gold": gold[position[r["id"]]],
             "teacher": teacher_pred[position[r["id"]]], "student": pred[position[r["id"]]]} for r, why in tail]
    write_jsonl(out_dir / "tail.jsonl", rows)
    t_acc = metrics.accuracy([r["gold"] for r in rows], [r["teacher"] for r in rows]) if rows else math.nan
    s_acc = metrics.accuracy([r["gold"] for r in rows], [r["student"] for r in rows]) if rows else math.nan
    m.update(tail_size=len(rows), tail_teacher_accuracy=t_acc, tail_student_accuracy=s_acc, tail_gap=t_acc - s_acc)

    if config.robustness:
        subset = robustness.pick_rows(holdout, config.robustness_rows)
        variants = robustness.rephrased_rows(subset)
        sample = {r["id"]: r for r in subset}
        got = student.answer([messages_like(sample[v["source_id"]], v["text"]) for v in variants])
        v_pred = [normalize(a["text"]) for a in got]
        write_jsonl(out_dir / "robustness.jsonl", [{**v, "student": p} for v, p in zip(variants, v_pred)])
        original = metrics.accuracy([gold[position[r["id"]]] for r in subset], [pred[position[r["id"]]] for r in subset])
        rephrased = metrics.accuracy([normalize(v["gold"]) for v in variants], v_pred)
        m.update(robustness_rows=len(subset), robustness_original_accuracy=original, robustness_accuracy=rephrased,
                 robustness_drop=original - rephrased)
    else:
        m.update(robustness_accuracy=None, robustness_drop=None)
    ood_answers = student.answer([messages_like(holdout[0], t) for t in ood])
    ood_conf = np.array([calibration.sequence_confidence(a["logprobs"]) or 0.0 for a in ood_answers])
    m.update(ood_size=len(ood), abstain_threshold=config.abstain_threshold,
             ood_abstain_rate=float(np.mean(ood_conf < config.abstain_threshold)),
             ood_mean_confidence=float(ood_conf.mean()))


    n, c = config.latency_requests, config.latency_concurrency
    with start_in_thread(_minimal_app(student)) as server:
        res = latency.measure(f"{server.url}/v1/chat/completions", latency.chat_payloads(holdout, "student", limit=n),
                              n, c, timeout_s=config.latency_timeout_s)
    m.update(student_server="minimal-generative", student_latency=res, student_p50_ms=res["p50_ms"],
             student_p95_ms=res["p95_ms"], student_p99_ms=res["p99_ms"])
    if teacher_url and teacher_model and config.latency_teacher:
        t = latency.measure(f"{teacher_url}/chat/completions", latency.chat_payloads(holdout, teacher_model, limit=n),
                            n, c, api_key=teacher_api_key, timeout_s=config.latency_timeout_s)
        m.update(teacher_latency=t, teacher_p50_ms=t["p50_ms"], teacher_p95_ms=t["p95_ms"], teacher_p99_ms=t["p99_ms"])
    else:
        m.update(teacher_latency=None, teacher_p50_ms=None, teacher_p95_ms=None, teacher_p99_ms=None)
    m["student_cost_per_1k"] = latency.student_cost_per_1k(config.student_cost_per_hour, res["throughput_rps"])
    m["teacher_cost_per_1k"] = latency.teacher_cost_per_1k(teacher_records, teacher_price)
    m["eval_s"] = round(time.perf_counter() - started, 2)
    return clean_json(m)
