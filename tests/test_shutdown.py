"""`lminf serve` under faults: SIGTERM lets the request in flight finish before the process exits,
and a client that goes away mid-prefill frees the worker. A real server process on a loopback
port, serving a tiny model saved to a folder."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.helpers import serve_process, tiny_model


@pytest.fixture(scope="module")
def model_folder(default_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(vocab_size=len(default_tokenizer), max_position_embeddings=64).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def server(model_folder):
    proc, base = serve_process(["--engine", "transformers", "--model", str(model_folder), "--n-local", "32"])
    yield proc, base, model_folder.name
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_until(condition, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_sigterm_lets_the_request_in_flight_finish(server):
    proc, base, name = server
    answers = []
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 400}
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{base}/v1/completions", json=body, timeout=300)))
    thread.start()
    wait_until(lambda: httpx.get(f"{base}/stats").json()["active_jobs"] > 0)
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    (answer,) = answers
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 400
    # uvicorn exits through the signal once it has finished (its exit code says SIGTERM, as a plain kill would)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_a_client_gone_mid_prefill_frees_the_worker(server):
    _, base, name = server
    long_prompt = "The miller's cat crossed the yard. " * 30000  # about 270k tokens: hundreds of prefill steps

    def gone_early():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": long_prompt, "max_tokens": 4}, timeout=1.0)

    gone_early()
    wait_until(lambda: httpx.get(f"{base}/stats").json()["active_jobs"] == 0, seconds=30)
    stats = httpx.get(f"{base}/stats").json()
    assert stats["generated_tokens"] == 0  # stopped in its prefill: no token was generated
