"""Command-line arguments every command shares: the model (path, dtype, device), the
strategy and its settings, and loading the model from them.

Each setting of each registered strategy gets one flag (`n_global` -> `--n-global`, help
from the field's metadata), so a new strategy's settings reach the command line with it.
A flag left out (None) means the strategy's own default.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from lminf.default_model import BUILT_IN, DEFAULT_MODEL, WEIGHTS, load_model
from lminf.kernels.sdpa import KERNELS, check_kernel
from lminf.patching import patch, takes_kv_dtype
from lminf.procedures import XL3M
from lminf.strategies import STRATEGIES, Strategy, get
from lminf.weights import int4
from lminf.weights.linear_layout import arrange_linear_weights

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def add_model_args(
    parser: argparse.ArgumentParser,
    n_local: int | None = None,
    top_k: int | None = None,
    vanilla: bool = True,
    strategy: bool = True,
    auto_weights: bool = False,
) -> None:
    """--model, --dtype, --device, --strategy and one flag per strategy setting; `n_local` and
    `top_k` set a command's own defaults for those settings. strategy=False: no --strategy
    (commands that compare the methods of --methods). auto_weights: --weights offers `auto`,
    its default (the decoding commands; see `weights_for`); else its default is dense."""
    parser.add_argument(
        "--model",
        default=None,
        help="a built-in model (smollm2-135m, the default; gemma3-270m), a local HF model folder or a cached hub id",
    )
    parser.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bfloat16 on GPU, float32 on CPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    weights_help = (
        "gguf: a built-in model's own 4/8-bit GGUF blocks in its linear layers (CPU; faster decoding, "
        "bfloat16 rounding of their inputs); dense: float weights"
    )
    kv_help = "store the cache's keys and values in 16 bits (half its memory and of what decoding reads); default: "
    if auto_weights:
        weights_help = "auto (default): gguf for a built-in model on CPU in float32, else dense; " + weights_help
        kv_help += "bfloat16 where --weights auto picks gguf, else the model's dtype (vanilla keeps the model's)"
    else:
        weights_help += " (default)"
        kv_help += "the model's dtype (vanilla keeps it)"
    parser.add_argument(
        "--weights",
        choices=["auto", *WEIGHTS] if auto_weights else WEIGHTS,
        default="auto" if auto_weights else "dense",
        help=weights_help,
    )
    parser.add_argument("--kv-dtype", choices=["bfloat16", "float16"], default=None, help=kv_help)
    parser.add_argument(
        "--kernel",
        type=_kernel,
        choices=KERNELS,
        default="auto",
        help="attention kernel: auto (the default): on CPU lminf's C++ kernels for a decoding step with float32 "
        "or 4-bit weights, every layer and its attention in one call (built on first use, ~15 s; "
        "LMINF_NATIVE=0 turns them off), torch's fused kernel for the rest, plain matmuls elsewhere",
    )
    if strategy:
        parser.add_argument("--strategy", default="lminf", choices=sorted(STRATEGIES), help="attention strategy (default lminf)")
    defaults = {"n_local": n_local, "top_k": top_k}
    for name, spec in _settings().items():
        default = defaults.get(name)
        own = {f.default for cls in STRATEGIES.values() for f in dataclasses.fields(cls) if f.name == name}
        shown = default if default is not None else spec.default if len(own) == 1 else "each strategy's own"
        help = spec.metadata.get("help", "") + ("" if shown is None else f" (default {shown})")
        parser.add_argument(f"--{name.replace('_', '-')}", type=_flag_type(spec), default=default, help=help)
    if vanilla:
        parser.add_argument("--vanilla", action="store_true", help="run the unpatched model, for comparison")


def strategy_from(args: argparse.Namespace, name: str | None = None, strict: bool = True, fixed: dict | None = None) -> Strategy:
    """Strategy `name` (default: --strategy) with the settings given on the command line and
    `fixed` ones on top. strict: a given setting the strategy does not have is an error."""
    cls = get(name or args.strategy)
    own = {f.name for f in dataclasses.fields(cls)}
    given = {k: getattr(args, k) for k in _settings() if getattr(args, k, None) is not None}
    foreign = sorted(set(given) - own)
    if strict and foreign:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        raise ValueError(f"--strategy {cls.name} has no setting {flags}; its settings: {', '.join(sorted(own))}.")
    return cls(**{**{k: v for k, v in given.items() if k in own}, **(fixed or {})})


def add_procedure_args(parser: argparse.ArgumentParser) -> None:
    """XL3M's settings (lminf.procedures.xl3m); its window is --n-local's (default: the training length)."""
    xl3m = parser.add_argument_group("xl3m (segment-wise inference around the plain model)")
    xl3m.add_argument("--segment-tokens", type=int, default=None, help="tokens per segment (default: the window / 8)")
    xl3m.add_argument("--overlap", type=int, default=None, help="tokens neighbouring segments share (default: a segment / 8)")
    xl3m.add_argument(
        "--question-tokens", type=int, default=XL3M.question_tokens,
        help=f"the input's last tokens that are its question (default {XL3M.question_tokens})",
    )  # fmt: skip
    xl3m.add_argument("--max-segments", type=int, default=None, help="keep at most this many segments (default: all that fit)")


def procedure_from(args: argparse.Namespace) -> XL3M:
    """XL3M with the settings given on the command line (add_procedure_args; --n-local its window)."""
    return XL3M(
        segment_tokens=getattr(args, "segment_tokens", None),
        overlap=getattr(args, "overlap", None),
        question_tokens=getattr(args, "question_tokens", XL3M.question_tokens),
        window=getattr(args, "n_local", None),
        max_segments=getattr(args, "max_segments", None),
    )


def dtype_for(name: str, device: str) -> torch.dtype:
    if name == "auto":  # CPUs without bfloat16 units run it several times slower than float32
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def weights_for(args: argparse.Namespace) -> str:
    """The weights --weights asks for. `auto`: a built-in model's own GGUF blocks where they run,
    on a CPU with float32 activations; dense elsewhere (a local model, a GPU, --dtype bfloat16).
    Both are exact to the model's file; a CPU decoding step reads every weight, and reading 4
    bits a weight instead of 32 is what brings it to llama.cpp's speed (docs/benchmarks-race-stack.json)."""
    if args.weights != "auto":
        return args.weights
    built_in = (args.model or DEFAULT_MODEL) in BUILT_IN
    float32_on_cpu = torch.device(args.device).type == "cpu" and dtype_for(args.dtype, args.device) == torch.float32
    return "gguf" if built_in and float32_on_cpu and int4.available() else "dense"


def kv_dtype_for(args: argparse.Namespace, weights: str, strategy: Strategy) -> torch.dtype | None:
    """The cache's dtype (None: the model's): --kv-dtype where given; else bfloat16 where
    --weights auto picked the GGUF blocks and the strategy's cache can store it (llama.cpp's
    default too: half the bytes a step reads from the cache)."""
    if args.kv_dtype:
        return DTYPES[args.kv_dtype]
    return torch.bfloat16 if args.weights == "auto" and weights == "gguf" and takes_kv_dtype(strategy) else None


def load(args: argparse.Namespace, patched: bool = True):
    """(model, tokenizer) as the arguments say; patched with --strategy and its settings."""
    weights = weights_for(args)
    model, tokenizer = load_model(args.model, dtype_for(args.dtype, args.device), weights)
    model.to(args.device)
    arrange_linear_weights(model)  # row-major again off the CPU
    if patched:
        strategy = strategy_from(args).resolve(model.config)
        patch(model, strategy, backend=args.kernel, kv_dtype=kv_dtype_for(args, weights, strategy))
    return model, tokenizer


def _kernel(name: str) -> str:
    """--kernel's value; a removed kernel says what replaced it."""
    try:
        check_kernel(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _settings() -> dict[str, dataclasses.Field]:
    """Every setting of every registered strategy, by name (first definition wins)."""
    found: dict[str, dataclasses.Field] = {}
    for cls in STRATEGIES.values():
        for spec in dataclasses.fields(cls):
            found.setdefault(spec.name, spec)
    return found


def _flag_type(spec: dataclasses.Field) -> type:
    return type(spec.default) if isinstance(spec.default, (int, float, str)) and not isinstance(spec.default, bool) else int
