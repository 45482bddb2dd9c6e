"""`lminf serve`'s OpenAPI document says what the server checks: its request bodies are there,
and a seeded schemathesis run over every route (the app in process, a tiny model) finds no
server error and no answer that breaks the document (status codes, content types, bodies)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

import lminf
from lminf.serve.engine import Engine
from lminf.serve.openai_api import create_app
from tests.helpers import tiny_model

schemathesis = pytest.importorskip("schemathesis")

MODEL = "tiny"


def tiny_app():
    from transformers import AutoTokenizer

    from lminf.default_model import converted_folder

    tokenizer = AutoTokenizer.from_pretrained(converted_folder())
    model = lminf.patch(tiny_model(vocab_size=len(tokenizer)), n_global=2, n_local=16)
    return create_app(Engine(model, tokenizer, MODEL, max_sessions=2, default_max_tokens=4))


app = tiny_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


def short(body):
    """Replies of a few tokens: a valid max_tokens stays valid but small (out-of-range ones stay as drawn)."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and float(value).is_integer() and 1 <= value <= 32768:
                body[field] = 1 + int(value) % 4
    return body


@schema.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_server_or_its_document(case):
    short(case.body)
    case.call_and_validate()


def test_the_document_holds_the_request_bodies_and_their_errors():
    document = TestClient(app).get("/openapi.json").json()
    for path, body in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        post = document["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}
        assert {"200", "400", "404"} <= set(post["responses"])
        assert set(post["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    chat = document["components"]["schemas"]["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and chat["properties"]["model"]["examples"] == [MODEL]
    assert document["components"]["schemas"]["Message"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]


def test_a_long_stop_string_is_accepted_and_a_fifth_is_refused():
    """OpenAI's rule: up to 4 stop strings, each as long as it likes."""
    client = TestClient(app)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2}
    assert client.post("/v1/completions", json=body | {"stop": "\n\nUser said:"}).status_code == 200
    assert client.post("/v1/completions", json=body | {"stop": ["a much longer stop string"] * 4}).status_code == 200
    refused = client.post("/v1/completions", json=body | {"stop": ["a", "b", "c", "d", "e"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stop"
