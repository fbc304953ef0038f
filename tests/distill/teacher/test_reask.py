"""One corrective re-ask for answers that name no label: charged once, served from the cache on resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distill.config import GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.teacher.generation import generate
from distill.teacher.labels import map_answer
from distill.teacher.ratelimit import Ledger
from distill.teacher.reask import reask_unmapped

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])


def test_unmapped_answers_are_reasked_once_with_the_label_list(tmp_path):
    app = standin.build_app(GOLDS, LABELS)
    # No label list in the prompt: the stand-in answers in its own words.
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": t}]} for i, t in enumerate(list(GOLDS)[:60])]
    with start_in_thread(app) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="m", input_price_per_1m=1.0,
                                output_price_per_1m=1.0)
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", ledger_path=tmp_path / "ledger.jsonl",
                               backoff_base_s=0.01, reask=True)
        records = generate(rows, teacher, gen).records
        before = sum(1 for r in records if map_answer(r["response"], LABELS))
        fixed, summary = reask_unmapped(records, LABELS, teacher, gen)
        sent = app.state.requests
        again, _ = reask_unmapped(records, LABELS, teacher, gen)  # a resumed run asks the same again
        assert app.state.requests == sent  # ... and the cache answers: nothing is paid twice
    after = sum(1 for r in fixed if map_answer(r["response"], LABELS))
    assert before < 0.5 * len(rows)
    assert after >= 0.97 * len(rows)
    assert summary["requested"] == len(rows) - before
    changed = [r for r in fixed if r.get("reasked")]
    assert changed and all(map_answer(r["first_response"], LABELS) is None for r in changed)
    assert [r["response"] for r in again] == [r["response"] for r in fixed]
    assert Ledger(gen.ledger_path, None).by_purpose()["reask"] > 0
    # The corrective turn carried the label list; the teacher's own answer was kept in the chat.
    reask_body = next(b for b in app.state.bodies if len(b["messages"]) == 3)
    assert reask_body["messages"][1]["role"] == "assistant" and "card_arrival" in reask_body["messages"][2]["content"]
