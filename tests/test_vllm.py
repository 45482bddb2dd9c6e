"""lminf inside vLLM equals lminf in transformers (needs vLLM; skipped where it is not installed).

A tiny random Llama (head size 64, which vLLM's CPU kernel supports) saved to a folder;
prompts several windows long, a short one, chunked prefill whose chunks do not align with
the KV blocks, n_global not a multiple of the block size, several requests in one batch.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

import lminf  # noqa: E402

N_GLOBAL, N_LOCAL, NEW_TOKENS = 10, 64, 12
LENGTHS = (300, 37, 129)  # past 4x the window, inside it, across it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return model, str(folder)


def run_vllm(folder: str, prompts: list[list[int]], settings: dict) -> list[tuple[list[int], list[float]]]:
    llm = vllm.LLM(
        folder,
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        block_size=32,
        max_num_batched_tokens=100,  # prefill in chunks of at most 100 tokens, not aligned with 32-token blocks
        enable_chunked_prefill=True,
        gpu_memory_utilization=0.2,  # the CPU backend reserves this fraction of memory
        kv_cache_memory_bytes=2**28,
        additional_config={"lminf": settings} if settings else {},
    )
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    del llm
    return [
        (list(o.outputs[0].token_ids), [o.outputs[0].logprobs[t][tok].logprob for t, tok in enumerate(o.outputs[0].token_ids)])
        for o in outputs
    ]


CASES = {  # None: plain vLLM, which the plugin must leave alone
    "plain": None,
    "lminf": {"strategy": "lminf", "n_global": N_GLOBAL, "n_local": N_LOCAL},
    "lminf-top2": {"strategy": "lminf", "n_global": N_GLOBAL, "n_local": N_LOCAL, "top_k": 2, "top_k_from_layer": 1},
    "sinks": {"strategy": "sinks", "n_global": N_GLOBAL, "n_local": N_LOCAL},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_equals_transformers(tiny, case):
    model, folder = tiny
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    settings = CASES[case]
    results = run_vllm(folder, prompts, settings)
    if settings is not None:
        lminf.patch(model, **settings)
    try:
        for prompt, (tokens, logprobs) in zip(prompts, results, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens]), use_cache=False).logits[0, len(prompt) - 1 : -1]
            want = logits.float().log_softmax(-1)
            # Greedy: each token vLLM chose is transformers' argmax, and its logprob the same (float32 noise).
            assert tokens == want.argmax(-1).tolist()
            chosen = want[torch.arange(len(tokens)), torch.tensor(tokens)]
            torch.testing.assert_close(torch.tensor(logprobs), chosen, rtol=0, atol=1e-4)
    finally:
        if settings is not None:
            lminf.unpatch(model)
