"""`lminf serve`'s app in process (FastAPI's TestClient), on a tiny model with the default tokenizer:
the key from LMINF_API_KEY, and seeded sampling through the OpenAI route."""

from __future__ import annotations

import pytest
import uvicorn
from fastapi.testclient import TestClient

import lminf
import lminf.cli
from tests.helpers import tiny_model


@pytest.fixture
def served_app(monkeypatch, default_tokenizer):
    """`lminf serve`'s app as the CLI builds it from its flags and environment, not run by uvicorn."""
    model = lminf.patch(tiny_model(vocab_size=len(default_tokenizer)), n_global=2, n_local=16)
    monkeypatch.setattr(lminf.cli, "load", lambda args: (model, default_tokenizer))
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))

    def serve(*flags: str):
        assert lminf.cli.main(["serve", "--engine", "transformers", *flags]) == 0
        return TestClient(apps[-1])

    return serve


def test_the_key_from_lminf_api_key_is_required(served_app, monkeypatch):
    monkeypatch.setenv("LMINF_API_KEY", "sesame")
    client = served_app()
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
    assert answer.status_code == 200 and answer.json()["data"][0]["object"] == "model"


def test_without_a_key_the_server_is_open(served_app, monkeypatch):
    monkeypatch.delenv("LMINF_API_KEY", raising=False)
    assert served_app().get("/v1/models").status_code == 200


def test_a_seeded_sampled_request_repeats_its_text(served_app, monkeypatch):
    monkeypatch.delenv("LMINF_API_KEY", raising=False)
    client = served_app()

    def reply(seed: int) -> str:
        messages = [{"role": "user", "content": "Tell me a story."}]
        body = {"model": lminf.default_model.model_name(None), "messages": messages, "max_tokens": 12}
        answer = client.post("/v1/chat/completions", json=body | {"temperature": 1.0, "seed": seed})
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]

    first = reply(seed=7)
    assert reply(seed=7) == first  # the second runs on the first's cached conversation: still the same draw
    # A random model's next-token distribution is nearly flat over 49k tokens: other draws differ.
    assert reply(seed=8) != first and reply(seed=9) != first
