"""Structured-output request bodies (checked against the real `openai` client) and the auto probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from starlette.requests import Request

from distill.config import ConfigError, GenerationConfig, TeacherConfig
from distill.httpserver import start_in_thread
from distill.teacher.generation import generate
from distill.teacher.ratelimit import Ledger
from distill.teacher.structured import choose_structured, label_schema, structured_params

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import chat_standin as standin  # noqa: E402

LABELS = json.loads((ROOT / "distill/data/banking77/categories.json").read_text())
GOLDS = standin.load_golds([str(ROOT / "distill/data/banking77/test.csv")])
TEXT = next(iter(GOLDS))
MESSAGES = [{"role": "system", "content": "Classify the message."}, {"role": "user", "content": TEXT}]


def capture_app():
    from fastapi import FastAPI

    bodies: list[dict] = []
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        bodies.append(json.loads(await request.body()))
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"label": "card_arrival"}'},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    return api, bodies


@pytest.mark.parametrize("mode", ["json_schema", "choice"])
def test_request_bodies_are_what_the_openai_client_sends(mode, tmp_path):
    import openai

    extra = structured_params(mode, LABELS, rationale=mode == "json_schema")
    api, bodies = capture_app()
    with start_in_thread(api) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="gpt-4o-mini")
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", top_logprobs=5, max_tokens=64, extra_params=extra)
        generate([{"id": "a", "messages": MESSAGES}], teacher, gen, api_key="k")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        sdk_kwargs = {"response_format": extra["response_format"]} if mode == "json_schema" else {"extra_body": extra}
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0.0,
                                               max_tokens=64, logprobs=True, top_logprobs=5, **sdk_kwargs)
    ours, sdk = bodies
    assert ours == sdk
    assert reply.choices[0].message.content == '{"label": "card_arrival"}'
    if mode == "json_schema":
        fmt = ours["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        schema = fmt["json_schema"]["schema"]
        assert schema["properties"]["label"]["enum"] == LABELS
        assert list(schema["properties"]) == ["rationale", "label"]  # the reason comes before the answer
        assert schema["additionalProperties"] is False and schema["required"] == ["rationale", "label"]
    else:
        assert ours["guided_choice"] == LABELS and ours["structured_outputs"] == {"choice": LABELS}


def test_label_schema_validates_only_labels():
    import jsonschema

    schema = label_schema(LABELS)
    jsonschema.validate({"label": "card_arrival"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"label": "Card arrival"}, schema)


@pytest.mark.parametrize("reject, expected", [(False, "json_schema"), (True, "choice")])
def test_auto_picks_what_the_endpoint_honours_and_charges_every_probe(reject, expected, tmp_path):
    app = standin.build_app(GOLDS, LABELS, reject_structured=reject)
    teacher = TeacherConfig(base_url="http://x/v1", model="standin", structured_output="auto",
                            input_price_per_1m=1.0, output_price_per_1m=1.0)
    ledger = Ledger(tmp_path / "ledger.jsonl", 1.0)
    with start_in_thread(app) as server:
        teacher = teacher.model_copy(update={"base_url": f"{server.url}/v1"})
        mode, extra = choose_structured(teacher, GenerationConfig(), LABELS, MESSAGES, None, ledger)
        sent = app.state.requests
    assert mode == expected
    assert extra == structured_params(expected, LABELS)
    entries = ledger.entries()
    assert [e["purpose"] for e in entries] == ["probe"] * sent
    assert ledger.spent() > 0 or reject  # a rejected probe reports no usage; an answered one is paid


def test_a_plain_prompt_endpoint_falls_back_to_off(tmp_path):
    from fastapi import FastAPI

    plain = FastAPI()

    @plain.post("/v1/chat/completions")
    async def chat():
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Card arrival"},
                             "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    with start_in_thread(plain) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="m", structured_output="auto")
        mode, extra = choose_structured(teacher, GenerationConfig(), LABELS, MESSAGES, None, None)
    assert (mode, extra) == ("off", {})


def test_an_unreachable_endpoint_is_named_at_once():
    from distill.httpserver import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    teacher = TeacherConfig(base_url=url, model="m", structured_output="off")
    with pytest.raises(ConfigError, match=url.replace(".", r"\.")):
        choose_structured(teacher, GenerationConfig(), LABELS, MESSAGES, None, None)


def ollama_v1_app(golds: dict[str, str]):
    """Ollama's OpenAI-compatible /v1 as its openai.go documents it: `response_format` json_schema becomes the
    native `format` (the schema itself), json_object becomes format "json"; unknown fields (vLLM's guided_choice,
    structured_outputs) are dropped; the reply obeys `format` or is free text when there is none."""
    from fastapi import FastAPI

    api = FastAPI()
    api.state.formats = []

    @api.post("/v1/chat/completions")
    async def chat(body: dict):
        fmt = body.get("response_format") or {}
        native = fmt.get("json_schema", {}).get("schema") if fmt.get("type") == "json_schema" else \
            ("json" if fmt.get("type") == "json_object" else None)
        api.state.formats.append(native)
        text = body["messages"][-1]["content"]
        gold = golds.get(text, LABELS[0])
        if isinstance(native, dict):  # the grammar-constrained decoder keeps to the schema's enum
            enum = native["properties"]["label"]["enum"]
            content = json.dumps({"label": gold if gold in enum else enum[0]})
        else:
            content = f"I think this is about {gold.replace('_', ' ')}."
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}}

    return api


def test_ollama_gets_its_format_through_v1_and_auto_picks_json_schema(tmp_path):
    app = ollama_v1_app(GOLDS)
    with start_in_thread(app) as server:
        teacher = TeacherConfig(base_url=f"{server.url}/v1", model="llama3.1", structured_output="auto")
        mode, extra = choose_structured(teacher, GenerationConfig(cache_path=tmp_path / "c.sqlite"), LABELS,
                                        MESSAGES, None, None)
        assert mode == "json_schema"
        gen = GenerationConfig(cache_path=tmp_path / "c.sqlite", extra_params=extra)
        rows = [{"id": "a", "messages": MESSAGES}]
        record = generate(rows, teacher, gen, api_key=None).records[0]
    fmt = app.state.formats[-1]
    # What Ollama documents for `format`: a JSON schema object; here the label enum, nothing else allowed.
    assert fmt == {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
                   "required": ["label"], "additionalProperties": False}
    assert json.loads(record["response"]) == {"label": GOLDS[TEXT]}


def test_ollamas_native_api_url_names_its_v1_endpoint():
    for url in ("http://localhost:11434", "http://localhost:11434/api", "http://127.0.0.1:11434/api/chat"):
        with pytest.raises(ValueError, match=r"Ollama's native API; use .*:11434/v1"):
            TeacherConfig(base_url=url)
    assert TeacherConfig(base_url="http://localhost:11434/v1/").base_url == "http://localhost:11434/v1"


def test_a_bare_off_in_yaml_means_off(tmp_path):
    from distill.config import load_config

    data = ROOT / "distill/data/banking77"
    (tmp_path / "c.yaml").write_text(f"task:\n  name: t\n  train_path: {data / 'train.csv'}\n  labels_path: "
                                     f"{data / 'categories.json'}\n  system_prompt: Classify.\nteacher:\n  structured_output: off\n")
    assert load_config(tmp_path / "c.yaml").teacher.structured_output == "off"
    assert load_config(tmp_path / "c.yaml", ["teacher.structured_output=off"]).teacher.structured_output == "off"
