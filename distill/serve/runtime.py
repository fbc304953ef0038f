"""The engine that runs a classifier student's forward pass: torch, ONNX Runtime, or ONNX Runtime INT8.

In: a student directory (`distill.models.classifier` format). Out: `StudentRuntime.predict(texts)`
-> (probabilities [n, labels] with the calibration temperature applied, prompt tokens per text).

`onnx` exports the fp32 student once with `torch.onnx.export` into `<student>/onnx/model.onnx`;
`onnx-int8` quantizes that export with onnxruntime's `MatMulNBitsQuantizer` (INT8 weights with a
scale per block of 64 input channels, activations quantized per block at run time) into
`model-int8.onnx`. An export records the SHA-256 of the weights it was made from (and the recipe version) and is redone
when they change, so a retrained student is never served through a stale graph. Both files are written to a
temporary name and renamed, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from distill.models.encoders import softmax

RUNTIMES = ("torch", "onnx", "onnx-int8")
# Bumped whenever the export or quantization recipe changes: older exports are then redone.
RECIPE = 4


def length_groups(lengths: list[int], slack: float = 0.25, overhead_tokens: int = 8) -> list[list[int]]:
    """Indices grouped by similar length: a group grows while its padding stays within `slack` of
    its real tokens (plus `overhead_tokens`, what one more forward call costs in tokens)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            group = groups[-1]
            if lengths[i] * (len(group) + 1) <= (1 + slack) * (real + lengths[i]) + overhead_tokens:
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def _padded(ids: list[list[int]], names: list[str], pad_id: int) -> dict[str, np.ndarray]:
    """The model's inputs for token id lists right-padded to the longest."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
    feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
    return {name: feeds[name] for name in names}


def weights_digest(student_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(student_dir.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _export_fp32(model, tokenizer, out: Path) -> None:
    """torch.onnx export of tokenized input -> logits, with the pooling the student was trained with."""
    import torch  # heavy: only when an export is made

    from distill.models.classifier import classifier_logits

    names = list(tokenizer(["a b"], return_tensors="pt").keys())

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return classifier_logits(self.inner, dict(zip(names, tensors)))

    enc = tokenizer(["an example sentence to trace", "short"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"logits": {0: "batch"}}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with torch.inference_mode():
        # dynamo=False: the TorchScript exporter needs only `onnx`, not onnxscript.
        torch.onnx.export(Logits(model.eval()), tuple(enc[n] for n in names), str(tmp), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    os.replace(tmp, out)


def _quantize_int8(fp32: Path, out: Path) -> None:
    import onnx  # heavy: only for the INT8 runtime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    # INT8 weights with a scale per block of 64 input channels, and INT8 compute (accuracy_level 4:
    # activations quantized per block at run time, ORT's MatMulNBits kernel). One scale per whole
    # activation tensor (quantize_dynamic's MatMulInteger) cannot cover the outliers of BERT-style
    # encoders: on the demo student it agreed with fp32 on 98.4 % of 1,000 BANKING77 test rows (98.7 %
    # with the head and FFN down-projections kept fp32); blocks of 64 on 99.6-99.8 % of two such sets
    # (128: 99.1-99.8 %), still ~1.5x faster than fp32 at batch 1. Static QDQ calibration (MinMax, on
    # training rows) reached 98.5 % and ran slower than fp32 on CPU. The classification head stays
    # fp32: a sliver of the compute, and rounding it flips close calls between labels.
    model = onnx.load(str(fp32))
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=64, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=matmuls[-1:], op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
    os.replace(tmp, out)


def export_onnx(student_dir: str | Path, int8: bool = False) -> Path:
    """The ONNX graph of a student (exported or quantized now unless a current one exists).

    Args:
        student_dir: the student directory; the graph goes to its `onnx/` folder.
        int8: return the INT8 dynamically quantized graph instead of the fp32 one.
    """
    student_dir = Path(student_dir)
    folder = student_dir / "onnx"
    folder.mkdir(exist_ok=True)
    stamp = folder / "export.json"
    digest = weights_digest(student_dir)
    fp32, q8 = folder / "model.onnx", folder / "model-int8.onnx"
    current = stamp.exists() and json.loads(stamp.read_text()) == {"weights_sha256": digest, "recipe": RECIPE}
    if not (current and fp32.exists()):
        from distill.models.classifier import ClassifierStudent

        student = ClassifierStudent(student_dir)
        _export_fp32(student.model, student.tokenizer, fp32)
        q8.unlink(missing_ok=True)
        stamp.write_text(json.dumps({"weights_sha256": digest, "recipe": RECIPE}))
    if int8 and not q8.exists():
        _quantize_int8(fp32, q8)
    return q8 if int8 else fp32


class StudentRuntime:
    """A classifier student behind one runtime; `predict` is the whole request-time compute.

    Args:
        student_dir: the student directory.
        runtime: "torch", "onnx" or "onnx-int8".
        threads: intra-op threads for the forward pass (None: the library's default).
        max_length: tokens kept per text.
    """

    def __init__(self, student_dir: str | Path, runtime: str = "torch", threads: int | None = None,
                 max_length: int = 64):
        from transformers import AutoTokenizer  # heavy

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.path = Path(student_dir)
        self.runtime = runtime
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # The tokenizers library's own batch call, without the transformers wrapper around it
        # (a third of the tokenizing time at batch 1); a copy, so the wrapper's state is untouched.
        from tokenizers import Tokenizer

        self._fast = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._fast.no_padding()
        self._fast.enable_truncation(max_length)
        self._pad_id = self.tokenizer.pad_token_id or 0
        config = json.loads((self.path / "config.json").read_text())
        id2label = config["id2label"]
        self.labels = [id2label[str(i)] for i in range(len(id2label))]
        cal = self.path / "calibration.json"
        self.temperature = float(json.loads(cal.read_text())["temperature"]) if cal.exists() else 1.0
        if runtime == "torch":
            from distill.models.classifier import ClassifierStudent

            self._student = ClassifierStudent(self.path, max_length=max_length, threads=threads)
            self._session = None
            self._inputs = list(self.tokenizer.model_input_names)
        else:
            import onnxruntime as ort  # heavy: only for the ONNX runtimes

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Spinning intra-op threads would take the cores the event loop and tokenizer need between batches.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            graph = export_onnx(self.path, int8=runtime == "onnx-int8")
            self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length, unpadded (what the HF tokenizer call gives)."""
        return [e.ids for e in self._fast.encode_batch(texts)]

    def logits(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Raw logits [n, labels] for a batch of texts, and the real tokens per text.

        The forward's cost grows with padded tokens, and one long text padded a batch of short
        ones to its length (BANKING77 questions run 5 to 64 tokens, 13 at the median). Texts are
        therefore run in groups of similar length, each padded only to its own longest.
        """
        ids = self.encode(texts)
        n_tokens = [len(x) for x in ids]
        out = None
        for group in length_groups(n_tokens):
            feeds = _padded([ids[i] for i in group], self._inputs, self._pad_id)
            logits = self._forward(feeds)
            if out is None:
                out = np.empty((len(texts), logits.shape[1]), dtype=np.float32)
            out[group] = logits
        return out, n_tokens

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self._session is not None:
            return self._session.run(["logits"], feeds)[0]
        import torch  # loaded already by the torch runtime

        from distill.models.classifier import classifier_logits

        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            return classifier_logits(self._student.model, tensors).float().numpy()

    def predict(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(calibrated probabilities [n, labels], prompt tokens per text) for one batch."""
        logits, n_tokens = self.logits(texts)
        return softmax(logits, self.temperature), n_tokens


def forward_floor_ms(runtime: StudentRuntime, texts: list[str], n: int = 200, warmup: int = 10) -> dict[str, float]:
    """In-process batch-1 time of tokenize + forward + softmax: what no server can beat.

    Returns {"p50_ms", "p95_ms", "n"} over `n` calls cycling through `texts`.
    """
    for i in range(warmup):
        runtime.predict([texts[i % len(texts)]])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        runtime.predict([texts[i % len(texts)]])
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)), "n": n}


def compare_runtimes(student_dir: str | Path, texts: list[str], gold: list[str] | None, runtimes: list[str],
                     threads: int | None = None, floor_calls: int = 200) -> dict[str, Any]:
    """Each runtime against the fp32 torch student on the same texts.

    Args:
        student_dir: the student directory.
        texts: holdout texts.
        gold: their gold labels (None: accuracy is not reported).
        runtimes: the runtimes to check ("torch" is always the reference).
        threads: intra-op threads for each runtime.
        floor_calls: batch-1 calls timed for each runtime's forward floor.
    Returns:
        {runtime: {"agreement", "accuracy", "accuracy_drop", "floor_p50_ms", "floor_p95_ms"}}; the
        drop is in accuracy points as a fraction (0.005 = half a point) versus torch fp32.
    """
    out: dict[str, Any] = {}
    reference = None
    for name in ["torch"] + [r for r in runtimes if r != "torch"]:
        rt = StudentRuntime(student_dir, name, threads=threads)
        probs = np.concatenate([rt.predict(texts[i:i + 64])[0] for i in range(0, len(texts), 64)])
        pred = probs.argmax(axis=1)
        reference = pred if reference is None else reference
        floor = forward_floor_ms(rt, texts, n=floor_calls)
        row = {"agreement": float(np.mean(pred == reference)), "floor_p50_ms": floor["p50_ms"],
               "floor_p95_ms": floor["p95_ms"], "accuracy": None, "accuracy_drop": None}
        if gold is not None:
            row["accuracy"] = float(np.mean([rt.labels[p] == g for p, g in zip(pred, gold)]))
            row["accuracy_drop"] = out["torch"]["accuracy"] - row["accuracy"] if out else 0.0
        out[name] = row
    return out
