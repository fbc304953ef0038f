"""Prefect tasks around evaluation, the readiness gate and the model registry."""

from __future__ import annotations

from collections import Counter

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from distill.config import EvaluateConfig, GateConfig, GenerationConfig, TeacherConfig

HEADLINE = ("teacher_accuracy", "student_accuracy", "retention", "agreement", "ece_before", "ece", "brier",
            "temperature", "tail_size", "tail_gap", "robustness_drop", "ood_abstain_rate", "output_entropy",
            "student_p50_ms", "student_p95_ms", "student_p99_ms", "teacher_p50_ms", "teacher_p95_ms",
            "teacher_p99_ms", "student_cost_per_1k", "teacher_cost_per_1k", "eval_s")


# No cache: the student directory changes between runs under the same path, and the
# latency numbers are only meaningful when measured now.
@task(name="evaluate-student", cache_policy=NO_CACHE)
def evaluate_student(student_dir: str, holdout_path: str, teacher_records_path: str | None,
                     labels: list[str] | None, evaluate: EvaluateConfig, run_dir: str, dataset_path: str | None = None,
                     teacher: TeacherConfig | None = None, max_new_tokens: int = 64,
                     generation: GenerationConfig | None = None) -> dict:
    """Measure the student (see distill.evaluate.classifier.evaluate_classifier); plots land in run_dir.

    Args:
        student_dir: the trained student.
        holdout_path: JSONL of the gold task rows.
        teacher_records_path: JSONL of the teacher's records for the holdout (None: there are none).
        labels: the label set; None for generation tasks (distill.evaluate.generative measures those).
        evaluate: the evaluate section.
        run_dir: the run directory (plots, tail.jsonl, robustness.jsonl).
        dataset_path: the training rows (JSONL): the temperature is fitted on those with split
            "validation", and the label frequencies of the rest define the rare labels of the tail.
        teacher: the teacher endpoint, for its latency and for unanswered user tail rows.
        max_new_tokens: generative answers' length cap (the teacher's generation.max_tokens).
        generation: the run's generation section (request cache, ledger): the LLM judge's calls go through it.
    """
    from distill.evaluate.classifier import evaluate_classifier
    from distill.evaluate.generative import evaluate_generative

    from distill.data import read_jsonl

    logger = get_run_logger()
    holdout = read_jsonl(holdout_path)
    teacher_records = read_jsonl(teacher_records_path) if teacher_records_path else []
    counts = validation = None
    if dataset_path:
        train_rows = read_jsonl(dataset_path)
        validation = [r for r in train_rows if r.get("split") == "validation"]
        counts = dict(Counter(r["target"] for r in train_rows if r.get("split", "train") == "train"))
        del train_rows
    url = model = key = None
    price = (0.0, 0.0)
    if teacher is not None:
        from distill_tasks.generate import resolve_key

        url, model, key = teacher.base_url, teacher.model, resolve_key(teacher)
        price = (teacher.input_price_per_1m, teacher.output_price_per_1m)
    if labels:
        metrics = evaluate_classifier(student_dir, holdout, teacher_records, labels, evaluate, run_dir,
                                      validation=validation, teacher_url=url, teacher_model=model,
                                      teacher_api_key=key, teacher_price=price, train_label_counts=counts)
    else:
        judge_key = key
        if evaluate.judge is not None and evaluate.judge.endpoint is not None:
            from distill_tasks.generate import resolve_key

            judge_key = resolve_key(evaluate.judge.endpoint)
        metrics = evaluate_generative(student_dir, holdout, teacher_records, evaluate, run_dir, teacher_url=url,
                                      teacher_model=model, teacher_api_key=key, teacher_price=price,
                                      max_new_tokens=max_new_tokens, validation=validation, teacher=teacher,
                                      generation=generation, judge_api_key=judge_key)
    rows = [{"metric": k, "value": metrics.get(k)} for k in HEADLINE]
    create_table_artifact(rows, key="evaluation-metrics", description="Student evaluation (gold holdout)")
    logger.info("student %s vs teacher %s accuracy (retention %s), ECE %s, P95 %s ms",
                metrics["student_accuracy"], metrics["teacher_accuracy"], metrics["retention"], metrics["ece"],
                metrics["student_p95_ms"])
    return metrics


@task(name="gate-student", cache_policy=NO_CACHE)
def gate_student(metrics: dict, gate: GateConfig) -> dict:
    """Ship / don't ship with the failing reasons (see distill.evaluate.gate.decide); also a markdown artifact."""
    from distill.evaluate.gate import decide

    logger = get_run_logger()
    decision = decide(metrics, gate)
    lines = [f"**{'SHIP' if decision['ship'] else 'DO NOT SHIP'}**", ""]
    lines += [f"- {r}" for r in decision["reasons"]] or ["All checks passed."]
    create_markdown_artifact(markdown="\n".join(lines), key="readiness-gate", description="Readiness gate decision")
    if decision["ship"]:
        logger.info("gate: ship")
    else:
        logger.warning("gate: do not ship: %s", "; ".join(decision["reasons"]))
    return decision


@task(name="register-student", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def register_student(task_name: str, run_id: str, model_dir: str, metrics: dict, decision: dict, lineage: dict,
                     registry_path: str, auto_promote: bool) -> dict:
    """Register the student as a challenger; promote it only when the gate passed and auto_promote is on.

    Returns:
        The registry entry, plus "promoted" (bool) and "champion" (the task's champion run id or None).
    """
    from distill.serve.registry import Registry

    logger = get_run_logger()
    reg = Registry(registry_path)
    metrics = {**metrics, "gate_ship": bool(decision.get("ship"))}
    lineage = {**lineage, "gate_reasons": list(decision.get("reasons", []))}
    entry = reg.register(task_name, run_id, model_dir, metrics, lineage)
    promoted = False
    if decision.get("ship") and auto_promote:
        entry = reg.promote(task_name, run_id, "gate passed and gate.auto_promote is on")
        promoted = True
        logger.info("promoted %s to champion of %s", run_id, task_name)
    else:
        why = "the gate failed" if not decision.get("ship") else "gate.auto_promote is off"
        logger.info("registered %s as a challenger of %s (not promoted: %s)", run_id, task_name, why)
    champion = reg.champion(task_name)
    return {**entry, "promoted": promoted, "champion": champion["run_id"] if champion else None}
