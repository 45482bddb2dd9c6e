"""Serving side by side, in one run: `lminf serve` (transformers engine), vLLM + lminf
(`lminf serve --engine vllm`) and plain vLLM, through the real `openai` client.

    python benchmarks/serving_bench.py [--workloads 1x1024,8x1024,32x1024,1x16384,8x16384]
                                       [--engines transformers,vllm-lminf,vllm-plain] [--max-tokens 128]
                                       [--out docs/serving.json] [--doc docs/benchmarks.md]

Runs in the vLLM venv (docs/vllm.md), on the default model. Each workload is N
concurrent streaming clients, each with its own prompt of the given length (slices of the
standard library's sources, so no two share a prefix) and `--max-tokens` generated tokens,
greedy. Reported per engine and workload: aggregate generated tokens/s (prompt tokens not
counted; generated tokens counted by re-tokenizing each reply), time to first token (mean),
p50/p99 inter-token latency (between streamed chunks), and the server's peak RSS (the
largest of its processes). Plain vLLM runs only where the prompt fits its 8,192-token
limit. Prints a table, writes JSON (re-running resumes: finished cells are kept), a plot
and its section of docs/benchmarks.md (the rest of the page is `lminf bench`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
from vllm_long import cpu_name, stdlib_ids  # benchmarks/ is on the path when a script in it runs

import lminf
from lminf.eval.tables import write_section
from lminf.vllm.server import small_cpu_env

MODEL = lminf.default_model.DEFAULT_NAME
ENGINES = {  # what each row of the table ran
    "transformers": "`lminf serve --engine transformers` (one request step at a time, 2 threads)",
    "vllm-lminf": "`lminf serve --engine vllm` (vLLM + the lminf plugin)",
    "vllm-plain": "vLLM's own server, no lminf settings, `--max-model-len 8192`",
}
TRAINING_LENGTH = 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(engine: str, port: int, max_model_len: int) -> list[str]:
    lminf_serve = [sys.executable, "-m", "lminf.cli", "serve", "--port", str(port), "--n-local", str(TRAINING_LENGTH)]
    vllm_opts = "--enforce-eager --max-num-seqs 32"
    if engine == "transformers":
        return [*lminf_serve, "--engine", "transformers", "--weights", "dense"]  # float32, as vLLM runs it
    if engine == "vllm-lminf":
        return [*lminf_serve, "--engine", "vllm", "--max-model-len", str(max_model_len), "--vllm-args", vllm_opts]
    folder = str(lminf.default_model.converted_folder())
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", MODEL,
            "--port", str(port), "--dtype", "float32", "--max-model-len", str(TRAINING_LENGTH),
            "--gpu-memory-utilization", "0.5", *vllm_opts.split()]  # fmt: skip


class Server:
    def __init__(self, engine: str, max_model_len: int):
        self.port = free_port()
        self.log = open(f"/tmp/serving-bench-{engine}.log", "w")
        env = small_cpu_env(os.environ)  # what `lminf serve --engine vllm` does, for plain vLLM too
        argv = server_argv(engine, self.port, max_model_len)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.peak = 0.0
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{engine} server exited; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=7200)
        self._watch = threading.Thread(target=self._sample_rss, daemon=True)
        self._watch.start()

    def _sample_rss(self) -> None:
        while self.proc.poll() is None:
            try:
                procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
                self.peak = max(self.peak, max(p.memory_info().rss for p in procs) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(tokenizer, clients: int, length: int) -> list[str]:
    ids = stdlib_ids(tokenizer, clients * length)
    return [tokenizer.decode(ids[i * length : (i + 1) * length]) for i in range(clients)]


def one_client(client, prompt: str, max_tokens: int, out: dict) -> None:
    start = time.perf_counter()
    stamps, text = [], []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].text)
    out.update(start=start, stamps=stamps, text="".join(text), end=time.perf_counter())


def run_workload(server: Server, tokenizer, clients: int, length: int, max_tokens: int) -> dict:
    texts = prompts(tokenizer, clients, length)
    results = [{} for _ in texts]
    threads = [
        threading.Thread(target=one_client, args=(server.client, t, max_tokens, r)) for t, r in zip(texts, results, strict=True)
    ]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    generated = sum(len(tokenizer(r["text"]).input_ids) for r in results)
    gaps = sorted(b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False))
    pick = (lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000) if gaps else (lambda q: float("nan"))
    return {
        "clients": clients,
        "prompt_tokens": length,
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "ttft_s": sum(r["stamps"][0] - r["start"] for r in results if r["stamps"]) / clients,
        "itl_p50_ms": pick(0.5),
        "itl_p99_ms": pick(0.99),
        "server_peak_rss_mib": server.peak,
    }


def table(data: dict) -> str:
    head = "| engine | clients x prompt | generated tok/s | TTFT s | ITL p50 ms | ITL p99 ms | server peak RSS MiB |\n"
    head += "|---|---|---|---|---|---|---|"
    rows = [
        f"| {engine} | {c['clients']} x {c['prompt_tokens']:,} | {c['tokens_per_s']:.1f} | {c['ttft_s']:.1f} | "
        f"{c['itl_p50_ms']:.0f} | {c['itl_p99_ms']:.0f} | {c['server_peak_rss_mib']:.0f} |"
        for engine in sorted(data["engines"], key=lambda e: list(ENGINES).index(e) if e in ENGINES else len(ENGINES))
        for c in sorted(data["engines"][engine].values(), key=lambda c: (c["prompt_tokens"], c["clients"]))
    ]
    return "\n".join([head, *rows])


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n, (engine, cells) in enumerate(data["engines"].items()):
        for ax, length in zip(axes, (1024, 16384), strict=True):
            points = sorted((c["clients"], c["tokens_per_s"]) for c in cells.values() if c["prompt_tokens"] == length)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=engine, color=f"C{n}")  # one colour per engine
    for ax, length in zip(axes, (1024, 16384), strict=True):
        ax.set(title=f"prompts of {length:,} tokens", xlabel="concurrent clients", ylabel="generated tokens/s", xscale="log")
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="1x1024,8x1024,32x1024,1x16384,8x16384")
    parser.add_argument("--engines", default="transformers,vllm-lminf,vllm-plain")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="docs/serving.json")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"engines": {}}
    data["machine"] = f"{cpu_name()}, {os.cpu_count()} cores, float32, {platform.system()}"
    reserved = small_cpu_env(os.environ).get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM's default (1)")
    data["note"] = f"vLLM's servers ran with VLLM_CPU_NUM_OF_RESERVED_CPU={reserved} (cores kept off the model)."
    data["settings"] = {"n_global": 10, "n_local": TRAINING_LENGTH, "max_tokens": args.max_tokens, "model": MODEL}
    _, tokenizer = lminf.load_default()
    workloads = [tuple(int(x) for x in w.split("x")) for w in args.workloads.split(",")]
    longest = max(length for _, length in workloads) + args.max_tokens + 64
    for engine in args.engines.split(","):
        cells = data["engines"].setdefault(engine, {})
        todo = [
            (c, n)
            for c, n in workloads
            if f"{c}x{n}" not in cells and (engine != "vllm-plain" or n + args.max_tokens <= TRAINING_LENGTH)
        ]
        if not todo:
            continue
        server = Server(engine, longest)
        try:
            for clients, length in todo:
                print(f"{engine}: {clients} clients x {length:,} tokens ...", file=sys.stderr, flush=True)
                cells[f"{clients}x{length}"] = run_workload(server, tokenizer, clients, length, args.max_tokens)
                out.write_text(json.dumps(data, indent=1) + "\n")
        finally:
            server.close()
    print(table(data))
    png = out.with_suffix(".png")
    plot(data, png)
    section = (
        f"## Serving\n\nGenerated by `python benchmarks/serving_bench.py` (JSON: `{out.name}`), every engine in one run. "
        f"Machine: {data['machine']}. Settings: {data['settings']}; greedy; every client its own prompt; plain vLLM "
        f"only where the prompt fits its 8,192-token limit. {data.get('note', '')} Each engine serves its workloads "
        "in the table's order from one start, so its peak RSS is the largest so far.\n\n"
        + "".join(f"- {name}: {ENGINES.get(name, name)}\n" for name in data["engines"])
        + f"\n{table(data)}\n\n![generated tokens/s vs clients]({png.name})\n"
    )
    write_section(Path(args.doc), "serving", section)


if __name__ == "__main__":
    main()
