"""Speculative decoding with the distilled student as the teacher's draft: acceptance rate and speed-up.

The open-weights teacher and the student share one tokenizer (a word-level vocabulary
over BANKING77's training texts and intents, built here; nothing is downloaded). The
teacher is a Llama-style model (--teacher-layers x --teacher-hidden) trained here with
distill's own `train_sft` (--teacher-steps) to answer each training text with a sentence
naming its gold intent, so that it behaves like a trained model with a task, not like
random weights (whose greedy continuations no small model can predict). The student is a
2-layer model a fraction of its size, trained by `train_sft` (full SFT, chat template,
completion-only loss) on the teacher's greedy answers to the same --train-prompts texts,
then written by `distill.models.export.export_draft` (which checks the tokenizers match) —
the path `distill export draft` takes.

On --eval-prompts other training texts (never test.csv), one prompt at a time, the
teacher decodes greedily twice: alone, and with the draft as `assistant_model`
(transformers assisted generation, --draft-tokens proposed per step, constant
schedule, no confidence cut-off). Both runs alternate per prompt, so load on the
machine hits both alike. Measured:

- acceptance_rate: draft tokens the teacher accepted / draft tokens proposed, counted
  inside transformers' candidate generator;
- tokens_per_teacher_forward: new tokens / teacher forward passes in assisted mode;
- speedup: wall time alone / wall time assisted, summed over the prompts;
- identical: share of prompts whose assisted output equals the teacher's alone.

Usage: python bench/speculative.py [--train-prompts 400] [--eval-prompts 40] [--max-new-tokens 48]
Last line: acceptance_rate=<float> tokens_per_teacher_forward=<float> speedup=<float> identical=<float>
"""

from __future__ import annotations

import argparse
import csv
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

from distill.offline import apply_offline_env

apply_offline_env()

DATA = Path(__file__).resolve().parents[1] / "distill/data/banking77/train.csv"
SYSTEM = "Answer the customer."
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def texts() -> list[tuple[str, str]]:
    """(text, the gold intent as a sentence) for every BANKING77 training row."""
    with open(DATA, encoding="utf-8", newline="") as f:
        return [(row["text"].lower(), f"this is about {row['category'].replace('_', ' ')} .")
                for row in csv.DictReader(f)]


def build_tokenizer(directory: Path, corpus: list[str], size: int):
    """A word-level tokenizer over the corpus' most common words, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for t in corpus for w in re.findall(r"\w+|[^\w\s]", t))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + [w for w, _ in words.most_common(size)]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok.save_pretrained(directory)
    return tok


def build_model(directory: Path, tok, hidden: int, layers: int, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(2, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def teacher_answers(teacher_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    from distill.models.causal import GenerativeStudent

    model = GenerativeStudent(teacher_dir, max_new_tokens=max_new_tokens, device="cpu")
    return [a["text"] for a in model.answer([chat(p) for p in prompts], batch_size=32)]


def train_student(student_dir: Path, prompts: list[str], answers: list[str], out: Path, steps: int,
                  learning_rate: float = 3e-3) -> str:
    from distill.config import SFTTrain
    from distill.train.lm import train_sft

    rows = [{"id": str(i), "text": p, "target": a, "messages": chat(p), "soft_labels": None, "source": "teacher",
             "weight": 1.0, "split": "train"} for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    cfg = SFTTrain(student_model=student_dir, learning_rate=learning_rate, batch_size=16, max_steps=steps,
                   max_length=128, eval_steps=steps, checkpoint_steps=steps, logging_steps=max(1, steps // 4),
                   device="cpu")
    return train_sft(rows, cfg, out, progress=False)["model_dir"]


def _counting_candidates():
    """Wrap transformers' assisted candidate generator to count proposed and accepted draft tokens."""
    from transformers.generation import candidate_generator as cg

    stats = {"proposed": 0, "accepted": 0}
    cls = cg.AssistedCandidateGenerator
    get, update = cls.get_candidates, cls.update_candidate_strategy

    def get_candidates(self, input_ids, **kw):
        ids, logits = get(self, input_ids, **kw)
        stats["proposed"] += ids.shape[1] - input_ids.shape[1]
        return ids, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        stats["accepted"] += int(num_matches)
        return update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    return stats


def measure(teacher_dir: Path, draft_dir: Path, prompts: list[str], max_new_tokens: int, draft_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    draft.generation_config.num_assistant_tokens = draft_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    forwards = {"n": 0}
    teacher.register_forward_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    stats = _counting_candidates()
    common = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    alone_s = assisted_s = 0.0
    same = new_tokens = assisted_forwards = 0
    with torch.inference_mode():
        for p in prompts:
            enc = tok.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
            t0 = time.perf_counter()
            alone = teacher.generate(**enc, **common)
            t1 = time.perf_counter()
            before = forwards["n"]
            assisted = teacher.generate(**enc, assistant_model=draft, **common)
            t2 = time.perf_counter()
            alone_s, assisted_s = alone_s + (t1 - t0), assisted_s + (t2 - t1)
            assisted_forwards += forwards["n"] - before
            new_tokens += assisted.shape[1] - enc["input_ids"].shape[1]
            same += int(torch.equal(alone, assisted))
    return {"acceptance_rate": stats["accepted"] / max(1, stats["proposed"]),
            "tokens_per_teacher_forward": new_tokens / max(1, assisted_forwards),
            "speedup": alone_s / assisted_s, "identical": same / len(prompts), "alone_s": alone_s,
            "assisted_s": assisted_s, "new_tokens": new_tokens,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "draft_params": sum(p.numel() for p in draft.parameters())}


def main() -> None:
    from distill.models.export import export_draft

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-prompts", type=int, default=400)
    ap.add_argument("--eval-prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="The student's training steps.")
    ap.add_argument("--teacher-steps", type=int, default=300, help="The teacher's own training steps.")
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=800)
    args = ap.parse_args()

    rows = texts()
    # Every 7th row: the prompts are spread over the intents instead of the file's first few.
    train = [t for t, _ in rows[::7][:args.train_prompts]]
    gold = [g for _, g in rows[::7][:args.train_prompts]]
    held = [t for t, _ in rows[3::7][:args.eval_prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer(tmp / "tok", [t for t, _ in rows] + [g for _, g in rows], args.vocab)
        t0 = time.perf_counter()
        init = build_model(tmp / "teacher-init", tok, args.teacher_hidden, args.teacher_layers, seed=0)
        teacher = Path(train_student(init, train, gold, tmp / "teacher-sft", args.teacher_steps, learning_rate=1e-3))
        print(f"teacher trained on {len(train)} intents in {time.perf_counter() - t0:.0f} s", flush=True)
        student = build_model(tmp / "student-init", tok, 64, 2, seed=1)
        t0 = time.perf_counter()
        answers = teacher_answers(teacher, train, args.max_new_tokens)
        trained = train_student(student, train, answers, tmp / "sft", args.steps)
        draft = export_draft(trained, tmp / "draft", teacher_dir=teacher)
        print(f"teacher answered {len(train)} prompts and the student trained in {time.perf_counter() - t0:.0f} s; "
              f"draft {draft['parameters']:,} parameters", flush=True)
        r = measure(teacher, Path(draft["dir"]), held, args.max_new_tokens, args.draft_tokens)
    print(f"teacher {r['teacher_params']:,} parameters, draft {r['draft_params']:,}; {len(held)} prompts, "
          f"{r['new_tokens']} tokens; alone {r['alone_s']:.2f} s, assisted {r['assisted_s']:.2f} s "
          f"({args.draft_tokens} draft tokens per step)")
    print(f"acceptance_rate={r['acceptance_rate']:.4f} tokens_per_teacher_forward={r['tokens_per_teacher_forward']:.3f} "
          f"speedup={r['speedup']:.3f} identical={r['identical']:.4f}")


if __name__ == "__main__":
    main()
