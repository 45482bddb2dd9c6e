"""A rolling-likelihood task through the lm-evaluation-harness past the training length:
`--model lminf` against `--model hf`, on the default model and a long public-domain text.

    PYTHONPATH=. python benchmarks/harness_rolling.py --threads 2 --out docs/measurements/harness-rolling.json

The task (written here, over local files) scores two documents, the text's first T and first
2T tokens (T: the training length), with loglikelihood_rolling. The mean NLL of tokens T..2T
is the difference of the two documents' log-likelihoods over the difference of their lengths.
Models: `lminf` (n_local T, one pass), `hf` with max_length 2T (one window: the model reads
past its training length) and `hf` as the harness runs it by default (max_length T: windows
that restart every T tokens with no context). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import lminf.eval.harness  # noqa: E402, F401  registers --model lminf
from lminf.default_model import converted_folder, model_name  # noqa: E402
from lminf.eval.data import find_document  # noqa: E402
from lminf.eval.runs import machine  # noqa: E402
from lminf.families import training_length  # noqa: E402


def write_task(folder: Path, texts: list[str]) -> None:
    (folder / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (folder / "rolling.yaml").write_text(
        f"task: lminf_long_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--document", default="emma", help="a text of `lminf data` (default emma)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/harness-rolling.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = str(converted_folder())
    from transformers import AutoConfig, AutoTokenizer

    tokenizer, t = AutoTokenizer.from_pretrained(folder), training_length(AutoConfig.from_pretrained(folder))
    ids = tokenizer(find_document(args.document).read_text(encoding="utf-8"))["input_ids"]
    texts = [tokenizer.decode(ids[:n]) for n in (t, 2 * t)]
    lengths = [len(tokenizer.encode(text)) for text in texts]  # as the harness counts them (then its prefix token)
    models = {
        f"lminf (n_local {t})": ("lminf", f"pretrained={folder},strategy=lminf,n_local={t}"),
        f"hf, max_length {2 * t} (one window)": ("hf", f"pretrained={folder},dtype=float32,max_length={2 * t}"),
        f"hf, max_length {t} (the default: windows)": ("hf", f"pretrained={folder},dtype=float32,max_length={t}"),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tasks:
        write_task(Path(tasks), texts)
        for label, (model, model_args) in models.items():
            run = simple_evaluate(
                model=model, model_args=model_args, tasks=["lminf_long_rolling"], device="cpu", batch_size=1,
                task_manager=TaskManager(include_path=tasks), log_samples=True,
            )  # fmt: skip
            short, long = (s["resps"][0][0] for s in run["samples"]["lminf_long_rolling"])
            rows[label] = {
                "loglikelihood": [short, long],
                "nll_first_t": -short / lengths[0],
                "nll_t_to_2t": (short - long) / (lengths[1] - lengths[0]),
            }
            print(f"{label}: NLL of tokens {t}..{2 * t} = {rows[label]['nll_t_to_2t']:.3f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "model": model_name(None), "document": args.document, "training_length": t, "tokens": lengths,
        "machine": machine(), "script": "benchmarks/harness_rolling.py", "commit": commit, "models": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n| model | NLL, tokens 0..{t} | NLL, tokens {t}..{2 * t} |\n|---|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['nll_first_t']:.3f} | {row['nll_t_to_2t']:.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
