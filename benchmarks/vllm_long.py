"""One request far past the training length through vLLM + lminf in a KV pool that fits only
the first tokens, the window and one prefill chunk; plain vLLM given the same pool.

    python benchmarks/vllm_long.py [--tokens 100000] [--n-local 8192] [--new-tokens 64] [--compare]
                                   [--out docs/measurements/vllm_long.json]

Runs in the vLLM venv (docs/vllm.md). The prompt is Python's own standard library
sources, concatenated (offline). Records the KV blocks in use after every engine step
(vLLM's kv_cache_usage_perc metric times the pool), wall times, and the worker's peak RSS;
with --compare, also the same greedy continuation from lminf in transformers. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"

import psutil  # noqa: E402  (vLLM depends on it)
import torch  # noqa: E402

import lminf  # noqa: E402
from lminf.vllm.server import small_cpu_env  # noqa: E402

os.environ.update(small_cpu_env(os.environ))  # as `lminf serve --engine vllm` does; read when the engine starts

BLOCK = 128  # vLLM's default on CPU


def cpu_name() -> str:
    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
    ]
    return names[0] if names else platform.machine()


def stdlib_ids(tokenizer, n: int) -> list[int]:
    """`n` tokens of the standard library's sources, largest files first (always on disk)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: -p.stat().st_size)
    ids: list[int] = []
    for path in files:
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the standard library holds fewer than {n} tokens")


def engine(settings: dict | None, blocks: int, page: int, args):
    import vllm

    return vllm.LLM(
        str(lminf.default_model.converted_folder()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=args.tokens + args.new_tokens,
        hf_overrides={"max_position_embeddings": args.tokens + args.new_tokens},
        block_size=BLOCK,
        max_num_batched_tokens=args.chunk,
        gpu_memory_utilization=0.5,
        kv_cache_memory_bytes=(blocks + 1) * page,  # + vLLM's null block
        disable_log_stats=False,
        additional_config={"lminf": settings} if settings else {},
    )


def worker_peak_mib() -> float:
    """Peak RSS of vLLM's engine and worker processes (children of this one), the largest."""
    peaks = []
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")]
        except OSError:
            pass
    return max(peaks, default=0.0)


def run_lminf(prompt: list[int], settings: dict, bound: int, page: int, args) -> dict:
    import vllm

    llm = engine(settings, bound, page, args)
    params = vllm.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, logprobs=1, ignore_eos=True)
    llm.llm_engine.add_request("long", {"prompt_token_ids": prompt}, params)
    used, times, done, start = [], [], None, time.perf_counter()
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            done = out if out.finished else done
        times.append(time.perf_counter() - start)
        usage = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}["vllm:kv_cache_usage_perc"]
        used.append(round(usage * bound))
        print(f"\rstep {len(used)}: {used[-1]} blocks in use, {times[-1]:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    peak = worker_peak_mib()
    del llm
    tokens = list(done.outputs[0].token_ids)
    prefill_steps = -(-len(prompt) // args.chunk)
    return {
        "tokens": tokens,
        "logprobs": [done.outputs[0].logprobs[t][tok].logprob for t, tok in enumerate(tokens)],
        "blocks_used_per_step": used,
        "prefill_s": times[prefill_steps - 1],
        "decode_tokens_per_s": (len(tokens) - 1) / (times[-1] - times[prefill_steps - 1]),
        "total_s": times[-1],
        "worker_peak_rss_mib": peak,
    }


def run_plain(bound: int, page: int, args) -> str:
    try:
        del_me = engine(None, bound, page, args)
        del del_me
        return "started (unexpected)"
    except RuntimeError as error:
        return f"refused at start: {error}"


def run_transformers(prompt: list[int], settings: dict, new_tokens: int) -> dict:
    model, _ = lminf.load_default()
    lminf.patch(model, **{k: v for k, v in settings.items() if k != "strategy"})
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [out.logits[t][0].float().log_softmax(-1)[tok].item() for t, tok in enumerate(tokens)]
    return {"tokens": tokens, "logprobs": logprobs, "total_s": time.perf_counter() - start}


def table(result: dict) -> str:
    got, used, chunk = result["lminf"], result["lminf"]["blocks_used_per_step"], result["chunk"]
    n, n_local = result["prompt_tokens"], result["settings"]["n_local"]
    prefill_steps, full = -(-n // chunk), -(-n_local // chunk) + 1  # steps; the first step after the window filled
    rows = [
        ("prompt tokens", f"{n:,}"),
        ("KV pool", f"{result['pool_blocks']} blocks = {result['pool_tokens']:,} tokens = {result['pool_mib']:.0f} MiB"),
        ("full attention would need", f"{result['full_attention_blocks_needed']:,} blocks"),
        (
            "blocks in use, prefill once the window is full",
            f"{min(used[full - 1 : prefill_steps - 1])}-{max(used[full - 1 : prefill_steps - 1])}",
        ),
        ("blocks in use, decoding", f"{min(used[prefill_steps:-1])}-{max(used[prefill_steps:-1])}"),
        ("prefill", f"{got['prefill_s']:.0f} s ({n / got['prefill_s']:.0f} tok/s)"),
        ("decode", f"{got['decode_tokens_per_s']:.1f} tok/s"),
        ("engine worker peak RSS", f"{got['worker_peak_rss_mib']:.0f} MiB"),
        ("plain vLLM, same pool", result["plain_vllm_same_pool"][:60]),
    ]
    if "transformers" in result:
        t = result["transformers"]
        same = f"{t['identical_tokens']}/{len(t['tokens'])} tokens identical, max |logprob diff| {t['max_abs_logprob_diff']:.1e}"
        rows.append(("vs lminf in transformers", same))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--n-local", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill tokens per engine step")
    parser.add_argument("--compare", action="store_true", help="also run lminf in transformers and compare")
    parser.add_argument("--out", default="docs/measurements/vllm_long.json")
    parser.add_argument("--report", action="store_true", help="print the table of an earlier run's JSON, run nothing")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(Path(args.out).read_text())))
        return

    model, tokenizer = lminf.load_default()
    config = model.config
    del model
    page = config.num_hidden_layers * BLOCK * config.num_key_value_heads * config.head_dim * 2 * 4  # float32 K and V
    bound = 1 + -(-(args.n_local - 1 + args.chunk) // BLOCK) + 1  # as lminf.vllm.kv_cache computes it
    settings = {"strategy": "lminf", "n_global": args.n_global, "n_local": args.n_local}
    prompt = stdlib_ids(tokenizer, args.tokens)
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, float32",
        "model": lminf.default_model.DEFAULT_NAME,
        "settings": settings,
        "prompt_tokens": len(prompt),
        "chunk": args.chunk,
        "block_size": BLOCK,
        "pool_blocks": bound,
        "pool_tokens": bound * BLOCK,
        "pool_mib": bound * page / 2**20,
        "full_attention_blocks_needed": -(-(args.tokens + args.new_tokens) // BLOCK),
        "lminf": run_lminf(prompt, settings, bound, page, args),
        "plain_vllm_same_pool": run_plain(bound, page, args),
    }
    if args.compare:
        ref = run_transformers(prompt, settings, args.new_tokens)
        got = result["lminf"]
        pairs = list(zip(got["tokens"], ref["tokens"], strict=True))
        same = next((t for t, (a, b) in enumerate(pairs) if a != b), len(pairs))  # steps before the first difference
        diffs = [abs(a - b) for a, b in zip(got["logprobs"][:same], ref["logprobs"][:same], strict=True)]
        result["transformers"] = {**ref, "identical_tokens": same, "max_abs_logprob_diff": max(diffs, default=0.0)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print(table(result))


if __name__ == "__main__":
    main()
