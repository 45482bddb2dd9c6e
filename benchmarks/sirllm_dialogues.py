"""SirLLM against StreamingLLM (`sinks`) at one cache size on the synthetic dialogues of
lminf.eval.dialogue (Grocery Shopping key recall, Rock-Paper-Scissors), on a built-in model.

    PYTHONPATH=. python benchmarks/sirllm_dialogues.py --cache 256 --episodes 20 --rounds 150 \
        --out docs/measurements/sirllm-dialogues.json

SirLLM runs as the released README runs it (4 first tokens, the rest scored, no recent ones;
decay 1.0 for Grocery, 0.9 for Rock-Paper-Scissors), with both scores; sinks keeps the 4 first
tokens and the cache size minus 4 most recent. The JSON is resumed if present; a table is printed.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

from lminf.default_model import BUILT_IN, load_model, model_name
from lminf.eval.dialogue import THROWS, dialogue_table, run_dialogue
from lminf.eval.methods import Patched
from lminf.eval.runs import machine
from lminf.strategies import build

N_GLOBAL = 4


def methods(cache: int, decay: float) -> list[Patched]:
    """sinks and sirllm (surprisal, released scores) with `cache` tokens in all."""
    return [
        Patched(build("sinks", n_global=N_GLOBAL, n_local=cache - N_GLOBAL), "sinks"),
        *(
            Patched(build("sirllm", n_global=N_GLOBAL, n_scored=cache - N_GLOBAL, n_local=0, decay=decay, score=score), name)
            for score, name in (("surprisal", "sirllm"), ("released", "sirllm-released"))
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=int, default=256, help="tokens every method keeps (default 256)")
    parser.add_argument("--episodes", type=int, default=20, help="grocery episodes (default 20)")
    parser.add_argument("--distractors", type=int, default=20, help="distractor turns per episode (default 20)")
    parser.add_argument("--rounds", type=int, default=150, help="Rock-Paper-Scissors rounds per player (default 150)")
    parser.add_argument("--tasks", default="grocery,rps", help="grocery, rps or both (default), e.g. one per process")
    parser.add_argument("--methods", default=None, help="comma list of sinks, sirllm, sirllm-released (default all)")
    parser.add_argument("--model", default=None, help=f"one of {', '.join(BUILT_IN)} or a local folder (default: default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/sirllm-dialogues.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "model": model_name(args.model),
        "machine": machine(),
        "cache": args.cache,
        "script": "benchmarks/sirllm_dialogues.py",
        "commit": commit,
        "format": "USER: ...\\n\\nASSISTANT: (the released loop's)",
    }
    # One run per decay: grocery with 1.0, Rock-Paper-Scissors with 0.9 (the README's).
    grocery_out = args.out.with_name(f"{args.out.stem}-grocery.json")
    rps_out = args.out.with_name(f"{args.out.stem}-rps.json")
    tasks = args.tasks.split(",")
    wanted = args.methods.split(",") if args.methods else None

    def methods_for(decay: float) -> list[Patched]:
        return [m for m in methods(args.cache, decay) if wanted is None or m.name in wanted]

    if "grocery" in tasks:
        found = methods_for(1.0)
        grocery = run_dialogue(model, tokenizer, found, args.episodes, args.distractors, 0, args.seed, grocery_out, meta)
        print(dialogue_table(grocery))
        print(f"wrote {grocery_out}")
    if "rps" in tasks:
        rps = run_dialogue(model, tokenizer, methods_for(0.9), 0, args.distractors, args.rounds, args.seed, rps_out, meta)
        print(dialogue_table(rps))
        print(f"wrote {rps_out}; players: dominant {', '.join(THROWS)}")


if __name__ == "__main__":
    main()
