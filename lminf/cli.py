"""Command line: `lminf generate`, `chat`, `serve`, `lm-eval`; `lminf data`, `eval` and `bench` live in lminf.eval.cli."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, TextStreamer

import lminf
from lminf.arguments import add_model_args, add_procedure_args, dtype_for, load, procedure_from, strategy_from
from lminf.eval import cli as eval_cli
from lminf.extras import LM_EVAL, SERVE, MissingExtra, require
from lminf.generation import cache_kwarg
from lminf.memory import peak_mib
from lminf.procedures import PROCEDURES
from lminf.weights.int4 import Int4Linear


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lminf", description="LM-Infinite for Hugging Face rotary models.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text after a long input, streamed to stdout")
    gen.add_argument("input", nargs="?", default="-", help="text file to read, or - for stdin (default)")
    gen.add_argument("-i", "--instruction", default="", help="instruction placed after the input")
    add_model_args(gen, auto_weights=True)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages loops (default 1: off)")
    gen.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens per prefill step")
    gen.add_argument(
        "--procedure", choices=sorted(PROCEDURES), default=None,
        help="xl3m: answer from the segments the plain model is most certain about (greedy; lminf.procedures.xl3m)",
    )  # fmt: skip
    gen.add_argument("--question", default=None, help="xl3m: the question, placed after the input (default: its last tokens)")
    add_procedure_args(gen)
    chat = commands.add_parser("chat", help="a terminal chat that never runs out of context")
    chat.add_argument("--system", default=None, help="system prompt, kept in force for the whole chat")
    add_model_args(chat, auto_weights=True)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer key (or set LMINF_API_KEY)")
    serve.add_argument(
        "--engine",
        choices=["auto", "transformers", "vllm"],
        default="auto",
        help=f"auto: vllm where it is installed, else transformers (here: {_auto_engine()})",
    )
    serve.add_argument(
        "--max-sessions", type=int, default=8, help="transformers engine: idle conversations kept for prefix reuse"
    )
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="transformers engine: largest request body")
    serve.add_argument(
        "--max-model-len", type=int, default=131072, help="vllm engine: longest prompt plus reply, in tokens (default 131072)"
    )
    serve.add_argument("--vllm-args", default="", help='vllm engine: more options for its server, e.g. "--max-num-seqs 64"')
    add_model_args(serve, auto_weights=True)

    # Listed for --help only: main() hands every argument after it to the harness.
    commands.add_parser("lm-eval", add_help=False, help="EleutherAI's lm-evaluation-harness, model type lminf registered")

    path = commands.add_parser("model-path", help="print a built-in model's local folder (converted on first use), e.g. for vLLM")
    path.add_argument("name", nargs="?", default=lminf.default_model.DEFAULT_MODEL, choices=sorted(lminf.default_model.BUILT_IN))
    eval_cli.add_commands(commands)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every argument after it is the harness's, --help included
        return _errors_as_exit_code(lambda: lm_eval(argv[1:]))
    args = parser.parse_args(argv)
    # transformers warns when a generation passes max_position_embeddings: that is the point here.
    transformers.logging.set_verbosity_error()
    if args.command in eval_cli.COMMANDS:
        return _errors_as_exit_code(lambda: eval_cli.run(args))
    command = {"generate": generate, "chat": chat_loop, "serve": serve_http, "model-path": model_path}[args.command]
    return _errors_as_exit_code(lambda: command(args))


def _errors_as_exit_code(run: Callable[[], int]) -> int:
    """run(), a refused input or setting printed as one line and exit code 2."""
    try:
        return run()
    except (ValueError, RuntimeError, OSError, MissingExtra) as error:
        print(f"lminf: error: {error}", file=sys.stderr)
        return 2


def lm_eval(harness_args: list[str]) -> int:
    """The harness's command line, after lminf.eval.harness registered the model type `lminf`."""
    require("lm_eval", LM_EVAL, "lm-eval")
    harness = importlib.import_module("lminf.eval.harness")
    argv = sys.argv
    sys.argv = ["lminf lm-eval", *harness_args]
    try:
        harness.cli()
    except SystemExit as done:  # the harness exits when it is done or refuses its arguments
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    finally:
        sys.argv = argv
    return 0


def generate(args: argparse.Namespace) -> int:
    text = _read_input(args.input)
    if not text.strip() and not args.instruction.strip():
        raise ValueError("the input is empty: give a file, pipe text on stdin, or pass --instruction.")
    if args.max_new_tokens < 1 or args.chunk_size < 1:
        raise ValueError("--max-new-tokens and --chunk-size must be >= 1.")
    if args.procedure:
        return generate_segmentwise(args, text)
    if args.question is not None:
        raise ValueError("--question is for --procedure xl3m; put a question to the other methods in --instruction.")
    model, tokenizer = load(args, patched=not args.vanilla)
    ids = _prompt_ids(tokenizer, text, args.instruction).to(args.device)

    cache = DynamicCache() if args.vanilla else lminf.make_cache(model)
    start = time.perf_counter()
    with torch.inference_mode():
        # All but the last prompt token go through the cache in chunks (timed apart); generate() does the rest,
        # in the same turn (a cache that counts turns, SirLLM's).
        lminf.begin_turn(cache, ids.shape[1] + args.max_new_tokens)
        lminf.prefill(model, ids[:, :-1], cache, chunk_size=args.chunk_size, progress=ids.shape[1] >= 4096, turn=False)
        prefill_s = time.perf_counter() - start
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwarg(model, cache),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature if args.sample else None,
            top_p=args.top_p if args.sample else None,
            top_k=None,
            repetition_penalty=args.repetition_penalty,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **({} if args.vanilla else {"turn": False}),
        )
        decode_s = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(
        f"[lminf] prompt {ids.shape[1]} tokens, generated {new} tokens, "
        f"prefill {prefill_s:.1f} s ({(ids.shape[1] - 1) / max(prefill_s, 1e-9):.0f} tok/s), "
        f"decode {new / max(decode_s, 1e-9):.1f} tok/s, peak memory {peak_mib(args.device) / 1024:.2f} GiB, "
        f"{_what_ran(model, cache)}",
        file=sys.stderr,
    )
    return 0


def generate_segmentwise(args: argparse.Namespace, text: str) -> int:
    """`lminf generate --procedure xl3m`: the plain model answers from the key context XL3M picks."""
    if args.sample or args.vanilla:
        raise ValueError("--procedure xl3m runs the plain model greedily: drop --sample and --vanilla.")
    model, tokenizer = load(args, patched=False)
    procedure = procedure_from(args)
    ids = _prompt_ids(tokenizer, text, args.instruction)
    if args.question is not None:
        # The question ends the user's text; it is what the prompt with it adds to the prompt without it.
        instruction = "\n\n".join(part for part in (args.instruction.strip(), args.question.strip()) if part)
        ids, without = _prompt_ids(tokenizer, text, instruction), ids
        same = (ids[0, : without.shape[1]] == without[0, : ids.shape[1]]).long().cumprod(0).sum()
        procedure = dataclasses.replace(procedure, question_tokens=ids.shape[1] - int(same))
    start = time.perf_counter()
    tokens, selection = procedure.generate(model, ids.to(args.device), args.max_new_tokens, stop={tokenizer.eos_token_id})
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    chosen = ", ".join(f"{a}-{b}" for a, b in (selection.spans[i] for i in selection.chosen))
    print(
        f"[lminf] xl3m: prompt {ids.shape[1]} tokens, {len(selection.spans)} segments, kept {len(selection.chosen)} "
        f"(tokens {chosen}), key context {selection.key_ids.shape[1]} tokens, generated {len(tokens)} tokens, "
        f"{time.perf_counter() - start:.1f} s, peak memory {peak_mib(args.device) / 1024:.2f} GiB",
        file=sys.stderr,
    )
    return 0


def _what_ran(model, cache) -> str:
    """The weights and the cache's dtype that decoded, e.g. "weights gguf, kv bfloat16"."""
    gguf = any(isinstance(module, Int4Linear) for module in model.modules())
    weights = "gguf" if gguf else f"dense {str(model.dtype).removeprefix('torch.')}"
    return f"weights {weights}, kv {str(cache.layers[0].keys.dtype).removeprefix('torch.')}"


def model_path(args: argparse.Namespace) -> int:
    print(lminf.default_model.converted_folder(args.name))
    return 0


def chat_loop(args: argparse.Namespace) -> int:
    from lminf.patching import settings_of
    from lminf.serve.session import Sampling, Session, Turn, pinned_prefix_length

    if args.vanilla:
        raise ValueError("chat needs the patched model; --vanilla is for `lminf generate`.")
    model, tokenizer = load(args)
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template; use `lminf generate` instead.")
    system = [{"role": "system", "content": args.system}] if args.system else []
    n_global = max(settings_of(model).n_global, pinned_prefix_length(tokenizer, system))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, seed=0)
    stop = {tokenizer.eos_token_id}
    messages, session, speed = list(system), Session(model, n_global), 0.0
    print("lminf chat: /reset starts over, /stats shows the cache, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, session = list(system), Session(model, n_global)
            print("(conversation reset)", file=sys.stderr)
            continue
        if line == "/stats":
            print(
                f"(tokens so far {len(session.tokens)}, pinned {n_global}, cache {session.memory_bytes() / 2**20:.1f} MiB, "
                f"last reply {speed:.1f} tok/s, peak memory {peak_mib(args.device) / 1024:.2f} GiB)",
                file=sys.stderr,
            )
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not prompt.startswith(session.text):  # the template rewrote the history: start afresh
            session = Session(model, n_global)
        turn, start = Turn(model, tokenizer, session, prompt, sampling, stop), time.perf_counter()
        for text in turn.steps():  # the reply is recorded into the session at the end
            print(text, end="", flush=True)
        print()
        speed = turn.completion_tokens / max(time.perf_counter() - start, 1e-9)
        messages.append({"role": "assistant", "content": turn.text})


def _served_name(args: argparse.Namespace) -> str:
    return lminf.default_model.model_name(args.model)


def _auto_engine() -> str:
    from lminf.vllm.server import vllm_installed

    return "vllm" if vllm_installed() else "transformers"


def serve_http(args: argparse.Namespace) -> int:
    if args.vanilla:
        raise ValueError("serve runs the patched model; --vanilla is for `lminf generate`.")
    if (args.engine if args.engine != "auto" else _auto_engine()) == "vllm":
        return serve_vllm(args)
    uvicorn = require("uvicorn", SERVE, "serve")
    from lminf.serve.engine import Engine
    from lminf.serve.openai_api import api_key_from_env, create_app

    model, tokenizer = load(args)
    name = _served_name(args)
    engine = Engine(model, tokenizer, name, max_sessions=args.max_sessions)
    app = create_app(engine, api_key_from_env(args.api_key), args.max_body_bytes)
    print(f"lminf: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serve_vllm(args: argparse.Namespace) -> int:
    """vLLM's OpenAI server with the plugin running the strategy; replaces this process."""
    import shlex

    from lminf.serve.openai_api import api_key_from_env
    from lminf.vllm.server import server_command, small_cpu_env, vllm_installed

    if not vllm_installed():
        raise ValueError("--engine vllm needs vLLM next to lminf (docs/vllm.md).")
    if args.weights not in ("auto", "dense") or args.kv_dtype or args.kernel != "auto":  # vLLM's auto: dense
        raise ValueError("--weights gguf, --kv-dtype and --kernel run on lminf's own engine: add --engine transformers.")
    model_dir = lminf.default_model.model_source(args.model)
    name = _served_name(args)
    extra = shlex.split(args.vllm_args)
    on_cpu = not torch.cuda.is_available()
    if on_cpu and "--gpu-memory-utilization" not in extra:
        extra += ["--gpu-memory-utilization", "0.5"]  # on CPU the share of RAM vLLM reserves; its 0.92 fails on a busy machine
    dtype = str(dtype_for(args.dtype, args.device)).removeprefix("torch.")
    argv, env = server_command(
        model_dir,
        strategy_from(args),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        name=name,
        api_key=api_key_from_env(args.api_key),
        dtype=dtype,
        extra=extra,
    )
    if on_cpu:
        env = small_cpu_env(env)
    print(f"lminf: serving {name} with vLLM on http://{args.host}:{args.port}/v1: {shlex.join(argv)}", file=sys.stderr)
    os.execve(argv[0], argv, env)
    return 0  # not reached


def _read_input(source: str) -> str:
    if source == "-":
        if sys.stdin.isatty():
            raise ValueError("no input: give a text file, or pipe text on stdin (lminf generate - < file.txt).")
        return sys.stdin.read()
    return Path(source).read_text(encoding="utf-8", errors="replace")


def _prompt_ids(tokenizer, text: str, instruction: str) -> torch.Tensor:
    # The instruction goes last: with Lambda attention the end of the input is what the
    # model reads at full resolution.
    content = "\n\n".join(part for part in (text.strip(), instruction.strip()) if part)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tokenizer(content, return_tensors="pt")["input_ids"]


if __name__ == "__main__":
    sys.exit(main())
