"""What a lent GPU must check, in one run of under eight minutes (docs/gpu-notes.md).

    python benchmarks/gpu_check.py --out "$OUT"            # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --out /tmp/g --dry-run  # anywhere: the same steps on CPU, tiny sizes

Steps, each under its own time limit, each recorded in OUT/gpu_check.json even when it fails:
1. environment: torch, CUDA, the device, lminf's commit;
2. correctness on the device: a small random Llama patched with each strategy agrees with the same
   model patched on CPU in float64 (the path the suite checks against the dense reference), equals
   the vanilla model inside the window, and decodes token by token as one forward does;
3. the suite's GPU cases (`pytest -m gpu`), where the suite defines the marker;
4. prefill and decoding against dense attention: `lminf bench --device cuda` on a random
   Llama-shaped model (about 1B parameters, bfloat16), vanilla (transformers' SDPA: flash
   attention on the GPU) against lminf, 4k to 32k tokens (OUT/bench-cuda.json, .md, .png);
5. the vLLM GPU path's status: is vLLM importable, and does the plugin leave it plain.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}
# Every registered strategy with a small window (and top-k), as the conformance suite sets them.
CHECKED = [
    ("lminf", {}),
    ("lminf", {"top_k": 2, "top_k_from_layer": 1}),
    ("sinks", {}),
    ("infllm", {"block_size": 4, "top_blocks": 2}),
]


def environment(device: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "checked_on": device,
        "commit": commit or None,
    }


def llama(shape: dict, dtype: torch.dtype, device: str):
    import transformers

    config = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype).eval()


def cache_keyword(model) -> str:
    """The cache keyword the installed transformers takes (`cache` from 5.25, `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def correctness(device: str) -> dict:
    """Each strategy on the device against the same weights patched on CPU in float64."""
    import lminf

    n_local = 16
    ids = torch.randint(0, TINY["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, settings in CHECKED:
        key = name + ("-topk" if settings.get("top_k") else "")
        reference = lminf.patch(llama(TINY, torch.float64, "cpu"), name, n_global=4, n_local=n_local, **settings)
        model = lminf.patch(llama(TINY, torch.float32, device), name, n_global=4, n_local=n_local, **settings)
        with torch.inference_mode():
            want = reference(ids, use_cache=False).logits.float()
            got = model(ids.to(device), use_cache=False).logits.float().cpu()
            cached = {cache_keyword(model): lminf.make_cache(model)}
            steps = [model(ids[:, :40].to(device), **cached).logits[:, -1]]
            steps += [model(ids[:, i : i + 1].to(device), **cached).logits[:, -1] for i in range(40, 80)]
            stepped = torch.stack(steps[:-1], 1).float().cpu()
        results[key] = {
            "max_abs_vs_cpu_float64": (got - want).abs().max().item(),
            "max_abs_decoding_vs_one_forward": (stepped - got[:, 39:79]).abs().max().item(),
        }
    vanilla = llama(TINY, torch.float32, device)
    patched = lminf.patch(llama(TINY, torch.float32, device), n_global=4, n_local=64)
    short = ids[:, :64].to(device)
    with torch.inference_mode():
        inside = (patched(short, use_cache=False).logits - vanilla(short, use_cache=False).logits).abs().max().item()
    results["lminf_inside_the_window_vs_vanilla"] = inside
    worst = max(max(v.values()) if isinstance(v, dict) else v for v in results.values())
    return {"results": results, "passed": worst < 1e-3, "bound": 1e-3}


def suite_gpu_cases(out: Path, limit: int) -> dict:
    ini = (REPO / "pyproject.toml").read_text()
    if '"gpu' not in ini and "'gpu" not in ini:
        return {"skipped": "the suite defines no gpu marker: no GPU cases yet"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"--junitxml={out / 'pytest-gpu.xml'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=limit)
    (out / "pytest-gpu.log").write_text(run.stdout + run.stderr)
    return {"returncode": run.returncode, "tail": run.stdout.strip().splitlines()[-1:]}


def random_model_folder(folder: Path, shape: dict, device: str) -> Path:
    """A random-weight Llama and a one-word tokenizer: token values do not change the speed."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    llama(shape, dtype, device).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(folder)
    return folder


def bench(out: Path, device: str, dry_run: bool, limit: int) -> dict:
    """Vanilla against lminf; the prompt in one call (--chunk-size = the longest length), so that
    vanilla's prefill is one causal SDPA call (flash attention on the GPU)."""
    folder = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # the weights stay on the machine, out of OUT
    try:
        random_model_folder(folder, TINY if dry_run else BIG, device)
        lengths = [96, 160] if dry_run else [4096, 16384, 32768]
        command = [
            sys.executable, "-m", "lminf.cli", "bench", "--model", str(folder), "--device", device,
            "--dtype", "float32" if dry_run else "bfloat16", "--methods", "vanilla,lminf",
            "--lengths", ",".join(map(str, lengths)), "--chunk-size", str(max(lengths)), "--vanilla-up-to", str(max(lengths)),
            "--n-local", "32" if dry_run else "4096", "--decode-tokens", "8" if dry_run else "32",
            "--out", str(out / "bench-cuda.json"), "--doc", str(out / "bench-cuda.md"),
            "--note", "benchmarks/gpu_check.py: a random Llama-shaped model; vanilla = transformers' SDPA",
        ]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    (out / "bench-cuda.log").write_text(run.stdout + run.stderr)
    return {"command": " ".join(command[1:]), "returncode": run.returncode, "table": run.stdout.strip().splitlines()[-12:]}


def vllm_status() -> dict:
    try:
        import vllm
    except Exception as error:  # absent, or built for another torch
        return {"vllm": None, "why": f"{type(error).__name__}: {error}"[:300],
                "plugin": "lminf/vllm computes lminf on vLLM's CPU backend only; on a GPU it warns and leaves vLLM plain"}
    return {"vllm": vllm.__version__,
            "plugin": "lminf/vllm computes lminf on vLLM's CPU backend only; on a GPU it warns and leaves vLLM plain"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the bench's files")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny sizes (no GPU needed)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs the steps on CPU.", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"dry_run": args.dry_run, "steps": {}}
    steps = [
        ("environment", lambda: environment(device)),
        ("correctness", lambda: correctness(device)),
        ("suite_gpu_cases", lambda: suite_gpu_cases(args.out, 90)),
        ("bench", lambda: bench(args.out, device, args.dry_run, 300)),
        ("vllm", vllm_status),
    ]
    for name, step in steps:
        start = time.perf_counter()
        try:
            report["steps"][name] = step()
        except Exception:
            report["steps"][name] = {"error": traceback.format_exc()[-2000:]}
        report["steps"][name]["seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(f"gpu_check: {name} done in {report['steps'][name]['seconds']} s", file=sys.stderr)
    failed = [n for n, s in report["steps"].items() if "error" in s or s.get("returncode") or s.get("passed") is False]
    print(json.dumps({"failed": failed}), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
