"""The evaluation of a generative (causal LM) student: the same measures, read from generated answers.

Answers are compared in one of two ways:

- a JSON task (`evaluate.answer_field`, e.g. "intent"): an answer counts when it
  parses as a JSON object holding that field, and the field's normalised value
  is compared with the gold answer (field accuracy) and with the teacher's field
  (field agreement); `json_valid_rate` is the share of answers that parse;
- free text: exact match after trimming, lower-casing and collapsing whitespace;
- optionally (`evaluate.judge`), an LLM judge's win/tie/loss of the student's answer
  against the teacher's, asked in both orders (distill.evaluate.judge).

Confidence is the probability of the generated answer. Its temperature is fitted
on the validation rows (correct = the answer matches the row's training target),
by scaling every decoding step's logits with one T (distill.models.causal): the
greedy answer is the same at every T, only its probability moves. `ece` is the
holdout ECE at that T, `ece_before` at T = 1; without validation rows no T is
fitted and `ece` is None, so the gate's calibration check reports it unmeasured
instead of passing on an uncalibrated number.

Answers are as long as the teacher's (`generation.max_tokens`), and the student
runs on the GPU when one is present.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError, EvaluateConfig, GenerationConfig, TeacherConfig
from distill.data import write_jsonl
from distill.evaluate import calibration, latency, metrics, robustness
from distill.evaluate.records import clean_json, first_records, messages_like
from distill.evaluate.tail import select_tail
from distill.httpserver import start_in_thread
from distill.models.causal import TEMPERATURE_GRID, GenerativeStudent
from distill.teacher.signals import token_logprobs

__all__ = ["GenerativeStudent", "answer_key", "evaluate_generative", "normalize", "score_answers"]


def normalize(text: str | None) -> str | None:
    """The form answers are compared in: trimmed, lower-cased, single spaces."""
    return None if text is None else " ".join(str(text).strip().lower().split())


def parse_json_field(text: str | None, field: str) -> tuple[bool, str | None]:
    """(answer is a JSON object, its field's value as text or None) for a structured answer."""
    if text is None:
        return False, None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False, None
    if not isinstance(obj, dict):
        return False, None
    value = obj.get(field)
    return True, None if value is None else (value if isinstance(value, str) else json.dumps(value))


def answer_key(text: str | None, field: str | None) -> str | None:
    """What an answer is judged by: its normalised JSON field (None when it has none), or the whole text."""
    if field is None:
        return normalize(text)
    return normalize(parse_json_field(text, field)[1])


def gold_key(gold: Any, field: str | None) -> str | None:
    """A gold answer in the same form: a bare value, or a JSON answer's field."""
    if field is not None and isinstance(gold, str) and gold.lstrip().startswith("{"):
        return answer_key(gold, field)
    return normalize(gold)


def _score(holdout: list[dict], answers: list[dict], teacher_records: list[dict], field: str | None) -> dict:
    """Student and teacher answers against gold and each other; the per-row keys come back too."""
    gold = [gold_key(r["gold"], field) for r in holdout]
    pred = [answer_key(a["text"], field) for a in answers]
    by_id = first_records(teacher_records)
    teacher_text, teacher_conf = [], {}
    for r in holdout:
        rec = by_id.get(r["id"])
        done = rec is not None and rec.get("status") == "done"
        teacher_text.append(rec.get("response") if done else None)
        c = calibration.sequence_confidence(token_logprobs(rec)) if done else None
        if c is not None:
            teacher_conf[r["id"]] = c
    teacher_pred = [answer_key(t, field) if t is not None else None for t in teacher_text]
    m: dict[str, Any] = {"n_holdout": len(holdout), "student_kind": "generative", "answer_field": field,
                         "max_new_tokens": None}
    m["teacher_accuracy"] = metrics.accuracy(gold, teacher_pred)
    m["student_accuracy"] = metrics.accuracy(gold, pred)
    m["retention"] = m["student_accuracy"] / m["teacher_accuracy"] if m["teacher_accuracy"] else math.nan
    m["agreement"] = metrics.agreement(pred, teacher_pred)
    m["teacher_unanswered"] = sum(t is None for t in teacher_text)
    if field is not None:
        answered = [t for t in teacher_text if t is not None]
        m.update(student_field_accuracy=m["student_accuracy"], teacher_field_accuracy=m["teacher_accuracy"],
                 field_agreement=m["agreement"],
                 json_valid_rate=float(np.mean([parse_json_field(a["text"], field)[0] for a in answers])),
                 teacher_json_valid_rate=float(np.mean([parse_json_field(t, field)[0] for t in answered]))
                 if answered else math.nan)
    else:
        m.update(exact_match=m["student_accuracy"], teacher_exact_match=m["teacher_accuracy"])
    m["mean_token_entropy"] = float(np.mean([a["mean_entropy"] for a in answers]))
    m["output_entropy"] = float(np.mean([a["first_entropy"] for a in answers]))
    m["label_entropy"] = metrics.label_entropy(pred)
    return {"metrics": m, "gold": gold, "pred": pred, "teacher_pred": teacher_pred, "teacher_conf": teacher_conf}


def fit_sequence_temperature(answers: list[dict], correct: list[bool]) -> float:
    """The TEMPERATURE_GRID entry whose answer probabilities best predict correctness (binary NLL)."""
    y = np.asarray(correct, dtype=float)
    best, best_loss = 1.0, math.inf
    for j, t in enumerate(TEMPERATURE_GRID):
        p = np.clip(np.exp([a["logprob_at"][j] for a in answers]), 1e-12, 1 - 1e-12)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        if loss < best_loss:
            best, best_loss = t, loss
    return best


def _at_temperature(answers: list[dict], t: float) -> list[list[dict]]:
    """Each answer's logprobs as one pseudo-token holding its log-probability at temperature t."""
    j = TEMPERATURE_GRID.index(t)
    return [[{"token": a["text"], "logprob": a["logprob_at"][j]}] for a in answers]


def _calibrate(student: GenerativeStudent, answers: list[dict], scored: dict, validation: list[dict],
               field: str | None, n_bins: int, out_dir: Path) -> dict:
    """Temperature fitted on validation rows, ECE before (T = 1) and after, reliability diagrams."""
    pred, gold = scored["pred"], scored["gold"]
    temperature = None
    if validation:
        got = student.answer([r["messages"] for r in validation])
        correct = [answer_key(a["text"], field) == gold_key(r["target"], field) for a, r in zip(got, validation)]
        temperature = fit_sequence_temperature(got, correct)
    m: dict[str, Any] = {"temperature": temperature, "temperature_rows": len(validation), "ece_bins": n_bins}
    plots = {}
    for mode in ("sequence", "label_token"):
        cal = calibration.generative_calibration(pred, gold, [a["logprobs"] for a in answers], n_bins, mode)
        m[f"ece_{mode}"], m[f"mce_{mode}"], m[f"brier_{mode}"] = cal["ece"], cal["mce"], cal["brier"]
        name = f"reliability_{mode}"
        calibration.reliability_diagram(cal["confidence"], cal["correct"], out_dir / f"{name}.png", n_bins,
                                        f"{mode.replace('_', '-')} probability")
        plots[name] = f"{name}.png"
    m.update(ece_before=m["ece_sequence"], mce=m["mce_sequence"], brier=m["brier_sequence"], ece=None, plots=plots)
    if temperature is not None:
        cal = calibration.generative_calibration(pred, gold, _at_temperature(answers, temperature), n_bins)
        m.update(ece=cal["ece"], mce=cal["mce"], brier=cal["brier"])
        calibration.reliability_diagram(cal["confidence"], cal["correct"], out_dir / "reliability_calibrated.png",
                                        n_bins, f"sequence probability at T={temperature:g}")
        plots["reliability_calibrated"] = "reliability_calibrated.png"
    return m


def _tail(holdout: list[dict], scored: dict, size: int, out_dir: Path) -> dict:
    tail = select_tail(holdout, scored["teacher_conf"], size)
    at = {r["id"]: i for i, r in enumerate(holdout)}
    rows = [{"id": r["id"], "reason": why, "gold": scored["gold"][at[r["id"]]],
             "teacher": scored["teacher_pred"][at[r["id"]]], "student": scored["pred"][at[r["id"]]]}
            for r, why in tail]
    write_jsonl(out_dir / "tail.jsonl", rows)
    t_acc = metrics.accuracy([r["gold"] for r in rows], [r["teacher"] for r in rows]) if rows else math.nan
    s_acc = metrics.accuracy([r["gold"] for r in rows], [r["student"] for r in rows]) if rows else math.nan
    return {"tail_size": len(rows), "tail_teacher_accuracy": t_acc, "tail_student_accuracy": s_acc,
            "tail_gap": t_acc - s_acc}


def _robustness(student: GenerativeStudent, holdout: list[dict], scored: dict, config: EvaluateConfig,
                field: str | None, out_dir: Path) -> dict:
    if not config.robustness:
        return {"robustness_accuracy": None, "robustness_drop": None}
    at = {r["id"]: i for i, r in enumerate(holdout)}
    subset = robustness.pick_rows(holdout, config.robustness_rows)
    variants = robustness.rephrased_rows(subset)
    sample = {r["id"]: r for r in subset}
    got = student.answer([messages_like(sample[v["source_id"]], v["text"]) for v in variants])
    v_pred = [answer_key(a["text"], field) for a in got]
    write_jsonl(out_dir / "robustness.jsonl", [{**v, "student": p} for v, p in zip(variants, v_pred)])
    original = metrics.accuracy([scored["gold"][at[r["id"]]] for r in subset],
                                [scored["pred"][at[r["id"]]] for r in subset])
    rephrased = metrics.accuracy([gold_key(v["gold"], field) for v in variants], v_pred)
    return {"robustness_rows": len(subset), "robustness_original_accuracy": original,
            "robustness_accuracy": rephrased, "robustness_drop": original - rephrased}


def _ood(student: GenerativeStudent, holdout: list[dict], config: EvaluateConfig, temperature: float | None) -> dict:
    ood = robustness.load_ood(config.ood_path)
    answers = student.answer([messages_like(holdout[0], t) for t in ood])
    j = TEMPERATURE_GRID.index(temperature if temperature is not None else 1.0)
    conf = np.exp([a["logprob_at"][j] for a in answers])
    return {"ood_size": len(ood), "abstain_threshold": config.abstain_threshold,
            "ood_abstain_rate": float(np.mean(conf < config.abstain_threshold)),
            "ood_mean_confidence": float(conf.mean())}


def _latency(student: GenerativeStudent, holdout: list[dict], teacher_records: list[dict], config: EvaluateConfig,
             teacher: dict) -> dict:
    """Student latency through distill's generative server, the teacher's through its endpoint, costs."""
    from distill.serve.generative import create_generative_app

    n, c, tokens = config.latency_requests, config.latency_concurrency, student.max_new_tokens
    with start_in_thread(create_generative_app(student, model_name="student")) as server:
        res = latency.measure(f"{server.url}/v1/chat/completions",
                              latency.chat_payloads(holdout, "student", limit=n, max_tokens=tokens),
                              n, c, timeout_s=config.latency_timeout_s)
    m = {"student_server": "distill.serve.generative", "student_latency": res, "student_p50_ms": res["p50_ms"],
         "student_p95_ms": res["p95_ms"], "student_p99_ms": res["p99_ms"]}
    if teacher.get("url") and teacher.get("model") and config.latency_teacher:
        t = latency.measure(f"{teacher['url']}/chat/completions",
                            latency.chat_payloads(holdout, teacher["model"], limit=n, max_tokens=tokens),
                            n, c, api_key=teacher.get("api_key"), timeout_s=config.latency_timeout_s)
        m.update(teacher_latency=t, teacher_p50_ms=t["p50_ms"], teacher_p95_ms=t["p95_ms"], teacher_p99_ms=t["p99_ms"])
    else:
        m.update(teacher_latency=None, teacher_p50_ms=None, teacher_p95_ms=None, teacher_p99_ms=None)
    m["student_cost_per_1k"] = latency.student_cost_per_1k(config.student_cost_per_hour, res["throughput_rps"])
    m["teacher_cost_per_1k"] = latency.teacher_cost_per_1k(teacher_records, teacher.get("price", (0.0, 0.0)))
    return m


def _judge(holdout: list[dict], answers: list[dict], teacher_records: list[dict], config: EvaluateConfig,
           judge_context: dict, out_dir: Path) -> dict:
    """The LLM judge's win/tie/loss of the student against the teacher (distill.evaluate.judge), when configured."""
    if config.judge is None:
        return {}
    from distill.evaluate.judge import judge_answers

    by_id = first_records(teacher_records)
    teacher = {r["id"]: by_id[r["id"]].get("response") if by_id.get(r["id"], {}).get("status") == "done" else None
               for r in holdout}
    student = {r["id"]: a["text"] for r, a in zip(holdout, answers)}
    return judge_answers(holdout, student, teacher, config.judge, judge_context.get("teacher"),
                         judge_context.get("generation"), out_dir, api_key=judge_context.get("api_key"))


def score_answers(student_dir: str | Path, rows: list[dict], field: str | None, max_new_tokens: int = 64) -> dict:
    """What drift's holdout sensors read for a generative student: {"accuracy", "entropy" (mean token
    entropy, the entropy-collapse signal), "n", "labels" (the distinct gold answers)}."""
    answers = GenerativeStudent(student_dir, max_new_tokens).answer([r["messages"] for r in rows])
    gold = [gold_key(r["gold"], field) for r in rows]
    pred = [answer_key(a["text"], field) for a in answers]
    return {"accuracy": metrics.accuracy(gold, pred), "entropy": float(np.mean([a["mean_entropy"] for a in answers])),
            "n": len(rows), "labels": sorted({g for g in gold if g is not None})}


def evaluate_generative(student_dir: str | Path, holdout: list[dict], teacher_records: list[dict],
                        config: EvaluateConfig, out_dir: str | Path, teacher_url: str | None = None,
                        teacher_model: str | None = None, teacher_api_key: str | None = None,
                        teacher_price: tuple[float, float] = (0.0, 0.0), max_new_tokens: int = 64,
                        validation: list[dict] | None = None, device: str | None = None,
                        teacher: TeacherConfig | None = None, generation: GenerationConfig | None = None,
                        judge_api_key: str | None = None) -> dict:
    """Measure a generative student; same metric names as evaluate_classifier where they apply.

    Args:
        student_dir: causal LM directory (full, merged or LoRA adapter).
        holdout: gold task rows.
        teacher_records: the teacher's records for the holdout rows.
        config: the evaluate section (answer_field picks JSON field scoring; tail_path is not used here).
        out_dir: where plots, tail.jsonl and robustness.jsonl go.
        teacher_url, teacher_model, teacher_api_key: the teacher endpoint, for its latency.
        teacher_price: (input, output) USD per 1M tokens.
        max_new_tokens: answer length cap (the flow passes generation.max_tokens, the teacher's).
        validation: training rows of split "validation" ("messages", "target"): the temperature is fitted there.
        device: "cpu" or "cuda"; None picks the GPU when one is present.
        teacher: the teacher endpoint, the judge's when config.judge names none.
        generation: the run's generation section: the judge's calls use its request cache, ledger and budget.
        judge_api_key: the judge's key; None reads its endpoint's api_key_env.
    Returns:
        A JSON-safe metrics dict.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not holdout or any(r.get("gold") is None for r in holdout):
        raise ConfigError("task.test_path: evaluation needs a holdout whose every row has a gold answer "
                          "(task.label_field names its column)")
    field = config.answer_field
    student = GenerativeStudent(student_dir, max_new_tokens, device)
    answers = student.answer([r["messages"] for r in holdout])
    scored = _score(holdout, answers, teacher_records, field)
    m = scored["metrics"]
    m.update(max_new_tokens=max_new_tokens, device=student.device)
    m.update(_calibrate(student, answers, scored, list(validation or []), field, config.ece_bins, out_dir))
    m.update(_tail(holdout, scored, config.tail_size, out_dir))
    m.update(_robustness(student, holdout, scored, config, field, out_dir))
    m.update(_ood(student, holdout, config, m["temperature"]))
    m.update(_judge(holdout, answers, teacher_records, config,
                    {"teacher": teacher, "generation": generation, "api_key": judge_api_key}, out_dir))
    m.update(_latency(student, holdout, teacher_records, config,
                      {"url": teacher_url, "model": teacher_model, "api_key": teacher_api_key, "price": teacher_price}))
    m["eval_s"] = round(time.perf_counter() - started, 2)
    return clean_json(m)
