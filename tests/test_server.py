"""`lminf serve` through the real `openai` client, on a loopback port, with the default model."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.helpers import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.model]  # every test here talks to a server subprocess running the default model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "SmolLM2-135M-Instruct"
N_LOCAL, N_GLOBAL, MAX_SESSIONS = 128, 10, 3


@pytest.fixture(scope="module")
def server():
    args = ["--engine", "transformers", "--api-key", KEY, "--n-local", str(N_LOCAL), "--max-sessions", str(MAX_SESSIONS)]
    proc, base = serve_process(args, headers=AUTH, seconds=240)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def stats(server) -> dict:
    return httpx.get(f"{server}/stats", headers=AUTH, timeout=60).json()


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health", headers=AUTH, timeout=60)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert httpx.get(f"{server}/health", timeout=60).status_code == 401  # the key guards every path


def test_chat_completion_and_stream_agree(client):
    reply = client.chat.completions.create(model=MODEL, messages=ask("Name three colors."), max_tokens=12)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=ask("Name three colors."), max_tokens=12, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text  # greedy both times


def test_text_completion_and_stream(client):
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
    assert done.choices[0].text and done.usage.completion_tokens <= 6
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == done.choices[0].text


def test_stop_strings_end_the_reply(client):
    full = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12).choices[0].text
    stop = full.strip()[2:4]  # a piece from inside the full reply
    assert stop and stop in full
    cut = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == cut.choices[0].text


def test_follow_up_turn_reuses_the_cache(client):
    first_messages = ask("What is the capital of Italy?")
    first = client.chat.completions.create(model=MODEL, messages=first_messages, max_tokens=10)
    answer = first.choices[0].message.content
    follow_up = [*first_messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Spain?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=10)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything of the first turn (prompt and reply) was reused; only the new turn was encoded.
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens - cached < 20


def test_input_far_past_the_window_is_bounded(client, server):
    long_text = "Once upon a time there was a little robot who loved to count stars. " * 60  # ~900 tokens > 7 windows
    reply = client.chat.completions.create(model=MODEL, messages=ask(long_text + "What did the robot love?"), max_tokens=8)
    assert reply.usage.prompt_tokens > 6 * N_LOCAL and reply.choices[0].message.content
    per_token = 30 * 2 * 3 * 64 * 4  # layers x (K, V) x kv heads x head dim x float32
    s = stats(server)
    assert s["sessions"] <= MAX_SESSIONS
    assert s["cache_bytes"] <= MAX_SESSIONS * (N_LOCAL + 64) * per_token  # window + pinned prefix per session


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b'{"model": "SmolLM2-135M-Instruct", "messages": []}', 400, "messages"),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10000000}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}',
            400,
            "max_tokens",
        ),
        (b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
        (b"[1, 2]", 400, None),
        (b"[" * 100_000, 400, None),  # nested deeper than Python's JSON parser goes
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x"}], "seed": 2361183241434822606848}',
            400,
            "seed",  # 2**71: more than torch.Generator.manual_seed takes
        ),
    ],
)
def test_bad_requests_get_openai_style_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers=AUTH, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


@pytest.mark.parametrize(
    "path, body, param",
    [  # valid JSON whose \u escapes spell a lone UTF-16 surrogate: no text a tokenizer takes
        (
            "chat/completions",
            rb'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "\ud800"}]}',
            "messages.0.content",
        ),
        (
            "chat/completions",
            rb'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi \udfff there"}], "stream": true}',
            "messages.0.content",
        ),
        ("completions", rb'{"model": "SmolLM2-135M-Instruct", "prompt": "\ud83d"}', "prompt"),
        ("completions", rb'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "stop": ["x", "\ud800"]}', "stop.1"),
        ("completions", rb'{"model": "\udc00", "prompt": "Hi"}', "model"),
    ],
)
def test_lone_surrogates_get_a_400_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server}/v1/{path}", content=body, headers=AUTH, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and "surrogate" in error["message"]
    assert error["code"] is None
    # A surrogate pair is one valid character, and the server still answers.
    pair = rb'{"model": "SmolLM2-135M-Instruct", "prompt": "Smile \ud83d\ude00", "max_tokens": 2}'
    ok = httpx.post(f"{server}/v1/completions", content=pair, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_oversized_body_and_api_key(server):
    big = b'{"model": "x", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    r = httpx.post(f"{server}/v1/completions", content=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(f"{server}/v1/models").status_code == 401
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_eight_concurrent_streaming_clients(client, server):
    errors, texts = [], []

    def user(k: int) -> None:
        try:
            for r in range(2):
                stream = client.chat.completions.create(
                    model=MODEL, messages=ask(f"Say the number {k}{r}."), max_tokens=8, stream=True
                )
                texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        except Exception as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(texts) == 16 and all(texts)
    s = stats(server)
    assert s["active_jobs"] == 0 and s["sessions"] <= MAX_SESSIONS
    assert s["peak_rss_bytes"] < 4 * 2**30


def test_client_disconnect_stops_generation(server):
    body = {"model": MODEL, "messages": ask("Write a very long story."), "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leaving the block closes the connection mid-stream
    before = stats(server)["generated_tokens"]
    for _ in range(120):
        if stats(server)["active_jobs"] == 0:
            break
        time.sleep(0.25)
    s = stats(server)
    assert s["active_jobs"] == 0
    assert s["generated_tokens"] - before < 50  # stopped long before 3000 tokens
