"""Shared fixtures: tiny random models saved and loaded through the real
`from_pretrained` path, free loopback ports, and one Prefect test harness.

Nothing here downloads anything: models are built from configs, tokenizers
from a word list.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from distill.httpserver import free_port  # noqa: F401 - tests import it from here
from distill.offline import apply_offline_env

apply_offline_env()

# A small closed vocabulary: enough for toy tasks and the BANKING77 smoke rows
# (unknown words map to [UNK], which is fine for a random model).
WORDS = (
    "a an the i my me you your is are was be to of and or not no yes can how what why where when "
    "card cards money transfer account balance pin top up refund payment pending declined lost stolen "
    "exchange rate fee charge cash atm withdraw withdrawal app phone new order arrive delivery verify "
    "identity change address close cancel help please hello thanks good bad cat dog red blue green "
    "positive negative neutral great terrible fine love hate ok one two three four five"
).split()


def build_bert_tokenizer(directory: Path):
    """A BERT-style WordPiece tokenizer over WORDS, saved to and reloaded from `directory`."""
    from transformers import AutoTokenizer, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz0123456789?!.,'")
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    # transformers 5 ignores `vocab_file=`; `vocab=` is the argument that takes the word list.
    tok = BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(directory)
    loaded = AutoTokenizer.from_pretrained(directory)
    assert len(loaded) > 100 and loaded.unk_token_id not in loaded("my card")["input_ids"]
    return loaded


def make_tiny_bert_classifier(directory: Path, labels: list[str], seed: int = 0, num_layers: int = 2) -> Path:
    """A random BertForSequenceClassification with `labels`, saved as safetensors."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    torch.manual_seed(seed)
    tok = build_bert_tokenizer(directory)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    BertForSequenceClassification(cfg).save_pretrained(directory, safe_serialization=True)
    AutoModelForSequenceClassification.from_pretrained(directory)  # prove the real load path works
    return directory


def make_tiny_bert_encoder(directory: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A random BertModel (no head), e.g. a stand-in for MiniLM in `init_from_teacher`."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = build_bert_tokenizer(directory)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(directory, safe_serialization=True)
    AutoModel.from_pretrained(directory)
    return directory


def make_tiny_causal_lm(directory: Path, seed: int = 0) -> Path:
    """A random Llama-style causal LM with a chat template, saved as safetensors.

    Sizes follow TRL's tiny test models (hidden 8..16, 2 layers).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789?!.,':{}\"")))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    # Registered as special tokens so the chat markers are never split by the pre-tokenizer.
    tok.add_special_tokens({"additional_special_tokens": specials[4:]})
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tok.save_pretrained(directory)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    AutoModelForCausalLM.from_pretrained(directory)
    AutoTokenizer.from_pretrained(directory)
    return directory


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where no CUDA device is present (CI's CPU runners)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random 3-label BERT classifier directory (labels positive/negative/neutral)."""
    return make_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-clf"), ["positive", "negative", "neutral"])


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_bert_encoder(tmp_path_factory.mktemp("tiny-enc"))


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def fresh_prefect_home(home: Path) -> Path:
    """`home` as the PREFECT_HOME of a CLI run, holding a fresh, already migrated Prefect database.

    Every CLI test wants a database of its own, and Prefect builds one by running all its
    migrations: 7 of the 14 s a temporary server took to start on a 2-core machine. The first call
    builds one with `prefect server database upgrade`; later calls copy that file. A home that has a
    database already (a run resumed in the same home) is left as it is.
    """
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(_migrated_prefect_db(), home / "prefect.db")
    return home


@functools.cache
def _migrated_prefect_db() -> Path:
    import atexit
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    template = Path(tempfile.mkdtemp(prefix="distill-prefect-db-"))
    atexit.register(shutil.rmtree, template, True)
    env = {**os.environ, "PREFECT_HOME": str(template)}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                   check=True, capture_output=True, timeout=300)
    return template / "prefect.db"


@pytest.fixture(scope="session")
def prefect_harness():
    """One real ephemeral Prefect API for the whole session (started only if a test asks)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
