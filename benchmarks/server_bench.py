"""Figures for `lminf serve` with the default model, measured through the openai client.

    python benchmarks/server_bench.py [--context 16384] [--turns 100] [--out runs/server.json]

1. Time to first token of a follow-up turn in a long conversation, with prefix reuse
   (the server kept the conversation's cache) and without (a fresh server).
2. Generated tokens/s with 1 and with 8 concurrent streaming clients.
3. Server memory (peak RSS) and cache bytes along a many-turn conversation.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import torch
import transformers

MODEL = "SmolLM2-135M-Instruct"


class Server:
    def __init__(self, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "lminf.cli", "serve", "--port", str(self.port), "--weights", "dense", *extra]  # float32
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        while True:
            try:
                if httpx.get(f"{self.base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=3600)

    def stats(self) -> dict:
        return httpx.get(f"{self.base}/stats").json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def ttft(client, messages, max_tokens=16) -> tuple[float, dict]:
    start = time.perf_counter()
    first, usage = None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return first, usage


def long_document(tokens: int) -> str:
    import _pydecimal  # a long real text that ships with Python

    text = Path(_pydecimal.__file__).read_text()
    from lminf.default_model import converted_folder

    tok = transformers.AutoTokenizer.from_pretrained(converted_folder())
    ids = tok(text)["input_ids"][:tokens]
    return tok.decode(ids)


def stream_tokens_per_second(server: Server, clients: int, max_tokens: int = 64) -> float:
    counts = []

    def one(k: int) -> None:
        stream = server.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me a story about the number {k}."}],
            max_tokens=max_tokens,
            stream=True,
        )
        counts.append(next(c.usage.completion_tokens for c in stream if c.usage is not None))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--conversation-n-local", type=int, default=None, help="window for part 3 (default: the model's)")
    parser.add_argument("--only-conversation", action="store_true", help="run part 3 alone")
    parser.add_argument("--out", type=Path, default=Path("runs/server.json"))
    args = parser.parse_args()
    report = {
        "model": f"{MODEL} (float32), n_global 10, n_local 8192",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }

    if not args.only_conversation:
        # 1. follow-up turn at a long conversation
        doc = long_document(args.context)
        conversation = [{"role": "user", "content": doc + "\n\nWhat is this code about?"}]
        server = Server("--max-sessions", "2")
        reply = server.client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=16)
        follow_up = [
            *conversation,
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": "Answer in one word."},
        ]
        reuse_s, reuse_usage = ttft(server.client, follow_up)
        server.close()
        server = Server()
        fresh_s, fresh_usage = ttft(server.client, follow_up)
        report["follow_up"] = {
            "prompt_tokens": fresh_usage["prompt_tokens"],
            "ttft_reuse_s": reuse_s,
            "cached_tokens": reuse_usage["prompt_tokens_details"]["cached_tokens"],
            "ttft_no_reuse_s": fresh_s,
        }
        print(report["follow_up"], flush=True)

        # 2. throughput with 1 and 8 clients
        stream_tokens_per_second(server, 1, 8)  # warm-up
        report["tokens_per_s"] = {"1": stream_tokens_per_second(server, 1), "8": stream_tokens_per_second(server, 8)}
        print(report["tokens_per_s"], flush=True)
        server.close()

    # 3. memory along a long conversation
    window = ["--n-local", str(args.conversation_n_local)] if args.conversation_n_local else []
    server = Server("--max-sessions", "1", *window)
    report["conversation_n_local"] = args.conversation_n_local or 8192
    messages, trace = [], []
    for turn in range(1, args.turns + 1):
        line = f"Turn {turn}. Here is line {turn} of a poem about the sea: the waves come and go. Add one line."
        messages.append({"role": "user", "content": line})
        r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        if turn in (1, 10, 25, 50, 75, 100, 150, args.turns):
            s = server.stats()
            trace.append(
                {
                    "turn": turn,
                    "conversation_tokens": r.usage.total_tokens,
                    "cached_tokens": r.usage.prompt_tokens_details.cached_tokens,
                    "peak_rss_bytes": s["peak_rss_bytes"],
                    "cache_bytes": s["cache_bytes"],
                }
            )
            print(trace[-1], flush=True)
    server.close()
    report["long_conversation"] = trace
    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    _print_tables(report, trace)


def _print_tables(report: dict, trace: list[dict]) -> None:
    f = report.get("follow_up")
    if f is None:
        _print_trace(trace)
        return
    print(f"\n| follow-up at {f['prompt_tokens']} tokens | time to first token |\n|---|---|")
    print(f"| with prefix reuse ({f['cached_tokens']} cached) | {f['ttft_reuse_s']:.2f} s |")
    print(f"| without (fresh server) | {f['ttft_no_reuse_s']:.2f} s |")
    t = report["tokens_per_s"]
    print(f"\n| clients | generated tokens/s (all clients) |\n|---|---|\n| 1 | {t['1']:.1f} |\n| 8 | {t['8']:.1f} |")
    _print_trace(trace)


def _print_trace(trace: list[dict]) -> None:
    print("\n| turn | conversation tokens | peak RSS MiB | cache MiB |\n|---|---|---|---|")
    for row in trace:
        rss, cache = row["peak_rss_bytes"] / 2**20, row["cache_bytes"] / 2**20
        print(f"| {row['turn']} | {row['conversation_tokens']} | {rss:.0f} | {cache:.1f} |")


if __name__ == "__main__":
    main()
