"""lminf inside vLLM equals lminf in transformers, in bounded KV memory (needs vLLM; skipped
where it is not installed: the README's test command runs this file in vLLM's own venv).

A tiny random Llama (head size 64, which vLLM's CPU kernel supports) saved to a folder;
prompts several windows long, a short one, chunked prefill whose chunks do not align with
the KV blocks, n_global not a multiple of the block size, several requests in one batch,
a KV pool too small to hold them all at full length (so freed blocks are handed to other
requests while they run), prefix caching on and off, requests preempted and resumed.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.model]

import lminf  # noqa: E402

os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # max_model_len past the model's own, as a long-input user sets it
N_GLOBAL, N_LOCAL, NEW_TOKENS, BLOCK = 10, 64, 12, 32
LENGTHS = (300, 37, 129, 250)  # past 4x the window, inside it, across it; the last shares 200 tokens with the first
VOCAB, KV_HEADS, HEAD, LAYERS = 256, 2, 64, 2
PAGE_BYTES = LAYERS * BLOCK * KV_HEADS * HEAD * 2 * 4  # one block of all layers: keys and values, float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return model, str(folder)


def make_llm(
    folder: str,
    settings: dict | None,
    kv_blocks: int,
    chunk: int = 100,
    max_model_len: int = 4096,
    page_bytes: int = PAGE_BYTES,
    **engine,
):
    """A vLLM engine over the folder with a pool of `kv_blocks` usable KV blocks."""
    return vllm.LLM(
        folder,
        skip_tokenizer_init=True,  # prompts are token ids
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        hf_overrides={"max_position_embeddings": max_model_len},  # rotary table for every position
        block_size=BLOCK,
        max_num_batched_tokens=chunk,  # prefill in chunks of `chunk` tokens, not aligned with the blocks
        enable_chunked_prefill=True,
        gpu_memory_utilization=0.2,  # the CPU backend reserves this fraction of memory
        kv_cache_memory_bytes=(kv_blocks + 1) * page_bytes,  # vLLM keeps one block aside (its null block)
        disable_log_stats=False,  # for the KV usage and preemption metrics
        additional_config={"lminf": settings} if settings else {},
        **engine,
    )


def greedy(llm, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], list[float]]]:
    params = vllm.SamplingParams(max_tokens=new_tokens, temperature=0.0, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        (list(o.outputs[0].token_ids), [o.outputs[0].logprobs[t][tok].logprob for t, tok in enumerate(o.outputs[0].token_ids)])
        for o in outputs
    ]


def metrics(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}


def assert_equals_transformers(model, settings: dict | None, prompts, results) -> None:
    """Each greedy token vLLM chose is transformers' argmax, and its logprob the same up to
    float32 noise (measured: within 1e-6; vLLM and transformers sum in different orders)."""
    if settings is not None:
        lminf.patch(model, **settings)
    try:
        for prompt, (tokens, logprobs) in zip(prompts, results, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens]), use_cache=False).logits[0, len(prompt) - 1 : -1]
            want = logits.float().log_softmax(-1)
            assert tokens == want.argmax(-1).tolist()
            chosen = want[torch.arange(len(tokens)), torch.tensor(tokens)]
            torch.testing.assert_close(torch.tensor(logprobs), chosen, rtol=0, atol=1e-4)
    finally:
        if settings is not None:
            lminf.unpatch(model)


LMINF = {"strategy": "lminf", "n_global": N_GLOBAL, "n_local": N_LOCAL}
# (settings, usable KV blocks, engine options); None: plain vLLM, which the plugin must leave alone.
# 12 blocks hold 384 tokens: less than the four prompts need at full length (728 + 48), more
# than one request's bound (1 first block + the window and a chunk in 6, + 1 partial: 8).
CASES = {
    "plain": (None, 160, {}),  # full attention: 128 blocks for one request of max_model_len (4,096)
    "lminf": (LMINF, 12, {"enable_prefix_caching": False}),
    "lminf-prefix-cache": (LMINF, 12, {"enable_prefix_caching": True}),
    "lminf-preempted": (LMINF, 9, {"scheduler_reserve_full_isl": False}),  # admitted beyond the pool: vLLM must preempt
    "lminf-top2": ({**LMINF, "top_k": 2, "top_k_from_layer": 1}, 160, {}),  # top-k reads the middle: every block kept
    "sinks": ({"strategy": "sinks", "n_global": N_GLOBAL, "n_local": N_LOCAL}, 12, {}),
    # Prompt + reply within the window: the batch runs vLLM's own kernel (Strategy.plain_up_to).
    "lminf-inside-window": (LMINF, 12, {"lengths": (37, 20, 50)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_equals_transformers(tiny, case):
    model, folder = tiny
    settings, kv_blocks, engine = CASES[case]
    engine = dict(engine)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in engine.pop("lengths", LENGTHS)]
    if len(prompts) > 3:
        prompts[3][:200] = prompts[0][:200]  # a shared prefix, for the prefix cache
    llm = make_llm(folder, settings, kv_blocks, **engine)
    results = greedy(llm, prompts)
    again = greedy(llm, prompts[:1]) if engine.get("enable_prefix_caching") else []  # served from cached blocks
    seen = metrics(llm)
    del llm
    assert_equals_transformers(model, settings, prompts + prompts[:1] * len(again), results + again)
    if case == "lminf-preempted":
        assert seen["vllm:num_preemptions"] > 0  # the case tests what it names
    if case == "lminf-prefix-cache":
        assert seen["vllm:prefix_cache_hits"] > 0


def test_tensor_parallel(tiny, monkeypatch):
    """tensor_parallel_size=2 (each worker holds half the heads and its own KV pool): the same
    greedy tokens and logprobs as lminf in transformers."""
    model, folder = tiny
    # vLLM binds each CPU worker's threads to a NUMA node; this machine has one: a core each.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS[:3]]
    # Each worker holds half of every block's heads, so a block costs it half the bytes.
    llm = make_llm(folder, LMINF, 12, page_bytes=PAGE_BYTES // 2, tensor_parallel_size=2, distributed_executor_backend="mp")
    results = greedy(llm, prompts)
    del llm
    assert_equals_transformers(model, LMINF, prompts, results)


def test_bounded_memory_long_prompt(tiny):
    """A prompt 40x the window, through a KV pool that fits only the first tokens, the window
    and one prefill chunk: it completes, exactly, with the pool's use flat once the window is
    full; plain vLLM refuses the same pool at start."""
    model, folder = tiny
    n_local, chunk, length, new_tokens = 256, 512, 10_000, 32
    settings = {"strategy": "lminf", "n_global": N_GLOBAL, "n_local": n_local}
    bound = 1 + -(-(n_local - 1 + chunk) // BLOCK) + 1  # first block + window and chunk + one partial: 26 blocks
    prompt = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = make_llm(folder, settings, bound, chunk=chunk, max_model_len=16384)
    engine = llm.llm_engine
    engine.add_request(
        "long", {"prompt_token_ids": prompt}, vllm.SamplingParams(max_tokens=new_tokens, temperature=0.0, logprobs=1)
    )
    used, finished = [], None
    while engine.has_unfinished_requests():
        assert len(used) < 4 * (length // chunk + new_tokens), "not finished: is the request stuck waiting for blocks?"
        for out in engine.step():
            finished = out if out.finished else finished
        used.append(round(metrics(llm)["vllm:kv_cache_usage_perc"] * bound))
    del llm
    tokens = list(finished.outputs[0].token_ids)
    logprobs = [finished.outputs[0].logprobs[t][tok].logprob for t, tok in enumerate(tokens)]
    assert len(tokens) == new_tokens
    assert_equals_transformers(model, settings, [prompt], [(tokens, logprobs)])
    steady = used[1 : length // chunk]  # prefill steps after the first chunk filled the window
    assert max(used) <= bound and len(set(steady)) == 1, used
    decoding = used[length // chunk + 1 : -1]
    assert max(decoding) <= 1 + -(-n_local // BLOCK) + 1, used  # decoding holds the first block and the window only
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        make_llm(folder, None, bound, chunk=chunk, max_model_len=16384)  # full attention needs 512 blocks for 16,384 tokens


def save_tiny(folder, config) -> str:
    import transformers

    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return str(folder)


BAD_CASES = [
    "n_local 0",
    "no rotary positions (GPT-2)",
    "unsupported family (Falcon)",
    "infllm",
    "sirllm",
    "longheads",
    "lminf-original",
]


def bad_case(case: str, tiny_config):
    """(hf config, lminf settings, the cause the engine must say) of a BAD_CASES case."""
    import transformers

    config, settings, cause = tiny_config, {"n_local": 0}, "n_local must be >= 1"
    if case.startswith("no rotary"):
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_head=2, n_layer=2, n_positions=4096)
        settings, cause = {"n_local": 64}, "lminf does not support model type 'gpt2'"
    elif case.startswith("unsupported"):
        config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=128, num_attention_heads=2, num_hidden_layers=2)
        settings, cause = {"n_local": 64}, "lminf does not support model type 'falcon'"
    elif case in ("infllm", "sirllm"):  # a block memory, scores from the logits: in lminf's cache, not in vLLM's blocks
        settings, cause = {"strategy": case, "n_local": 64}, "runs through lminf.patch, not vLLM yet"
    elif case == "longheads":  # chunk summaries per query head, in lminf's cache
        settings, cause = {"strategy": case, "chunk_tokens": 16, "attention_length": 64}, "reads chunk summaries"
    elif case == "lminf-original":  # the last query of each call picks: vLLM's chunks would change it
        settings = {"strategy": "lminf-original", "n_local": 64, "top_k_from_layer": 1}  # the tiny model has 2 layers
        cause = "depends on how the input is split into calls"
    return config, settings, cause


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_settings_are_refused_by_the_engines_check(tiny, case):
    """What the plugin checks when vLLM builds an attention layer (LminfCPUAttentionImpl): the
    strategy (strategy_from_config), then the model's rotary frequencies."""
    from types import SimpleNamespace

    from lminf.vllm import CONFIG_KEY
    from lminf.vllm.backend import rotary_inv_freq, strategy_from_config

    config, settings, cause = bad_case(case, tiny[0].config)
    engine = SimpleNamespace(additional_config={CONFIG_KEY: settings}, model_config=SimpleNamespace(hf_config=config))
    with pytest.raises(ValueError, match=re.escape(cause)):
        strategy_from_config(engine)
        rotary_inv_freq(config)


@pytest.mark.parametrize("case", ["longheads", "sliding layers (Gemma 3)"])
def test_bad_settings_fail_at_engine_start(tiny, tmp_path, capfd, case):
    """At engine start, with the cause in the engine's log: a refused strategy (the check above,
    as vLLM calls it) and a model with sliding layers (refused where vLLM builds a layer)."""
    import transformers

    if case.startswith("sliding"):  # lminf runs those layers through transformers, not yet inside vLLM
        config = transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
        folder, settings, cause = save_tiny(tmp_path, config), {"n_local": 64}, "supports plain rotary full-attention layers only"
    else:
        _, settings, cause = bad_case(case, tiny[0].config)
        folder = tiny[1]
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        make_llm(folder, settings, 64)
    seen = capfd.readouterr()
    assert cause in seen.out + seen.err  # the cause, in the engine's log


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_text_ids(tokenizer, n: int) -> list[int]:
    import _pydecimal  # an offline long text: Python's own decimal module

    ids = tokenizer(open(_pydecimal.__file__, encoding="utf-8").read()).input_ids
    assert len(ids) >= n
    return ids[:n]


def test_default_model_past_training_length():
    """The default model (trained on 8,192 tokens) on a 9,000-token prompt, in a KV pool that
    fits one request's bound only: the same greedy tokens and logprobs as in transformers."""
    model, tokenizer = lminf.load_default()
    n_local, chunk = 1024, 512
    settings = {"strategy": "lminf", "n_global": N_GLOBAL, "n_local": n_local}
    config = model.config
    page = config.num_hidden_layers * BLOCK * config.num_key_value_heads * config.head_dim * 2 * 4
    bound = 1 + -(-(n_local - 1 + chunk) // BLOCK) + 1
    prompt = long_text_ids(tokenizer, 9000)
    folder = str(lminf.default_model.converted_folder())
    llm = make_llm(folder, settings, bound, chunk=chunk, max_model_len=16384, page_bytes=page)
    results = greedy(llm, [prompt], new_tokens=16)
    del llm
    assert_equals_transformers(model, settings, [prompt], results)


def test_lminf_serve_engine_vllm(tmp_path):
    """`lminf serve --engine vllm` starts vLLM's OpenAI server running lminf: a completion of
    a prompt 6x the window equals lminf's greedy text in transformers."""
    import subprocess
    import sys
    import time

    import httpx

    model, tokenizer = lminf.load_default()
    n_local, port = 256, free_port()
    prompt = tokenizer.decode(long_text_ids(tokenizer, 1500))
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "lminf.cli", "serve", "--engine", "vllm", "--port", str(port), "--n-local", str(n_local)]
    cmd += ["--max-model-len", "4096", "--vllm-args", "--enforce-eager --kv-cache-memory-bytes 200000000"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300).json()
    finally:
        server.terminate()
        server.wait(60)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    lminf.patch(model, n_global=10, n_local=n_local)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
    finally:
        lminf.unpatch(model)
    assert reply["usage"]["prompt_tokens"] == ids.shape[1]
    assert reply["choices"][0]["text"] == tokenizer.decode(out[0, ids.shape[1] :])
