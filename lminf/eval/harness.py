"""lminf as an EleutherAI lm-evaluation-harness model: `lminf lm-eval run --model lminf ...`.

Importing this module registers the model type `lminf` with the harness (its documented
`register_model` decorator: the installed harness, 0.4.13, has no plugin entry point, so
`lminf lm-eval` is the harness's own command line with the model registered first).

    lminf lm-eval run --model lminf --model_args pretrained=smollm2-135m,strategy=lminf,n_local=8192 --tasks ...

model_args: `pretrained` (a built-in model's name, a local folder, or nothing for the default
model), `strategy` (a registered strategy's name, or `vanilla` for the unpatched model),
`dtype`, `weights` (dense or gguf), `chunk_size` (prompt tokens per forward), and the
strategy's own settings by name (`n_global`, `n_local`, `top_k`, ...). `max_length` and
`tokenizer` are accepted for the tasks that read them (RULER sizes its prompts with the
tokenizer named there): lminf truncates nothing.

Every request reads its whole input through the strategy's cache, chunk by chunk, so nothing
is truncated: `loglikelihood_rolling` scores a document in one pass (the `hf` model cuts it
into windows of its max_length instead), and only the scored positions get output logits.
Requests run one at a time (batch_size is accepted and ignored). `generate_until` is greedy.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  the harness's own models first: it fills an empty registry, not one lminf began
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lminf.caches import begin_turn
from lminf.default_model import load_model
from lminf.generation import PREFILL_CHUNK, cache_kwarg, decoder, prefill, token_nll
from lminf.patching import make_cache, patch

VANILLA = "vanilla"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("lminf")
class LminfLM(TemplateLM):
    """The harness's model type `lminf`: a built-in or local model run with one registered strategy
    (model_args as the module says); `max_length`, `tokenizer` and the batch sizes are accepted and unused."""

    def __init__(
        self,
        pretrained: str | None = None,
        strategy: str = "lminf",
        dtype: str = "float32",
        weights: str = "dense",
        chunk_size: int = PREFILL_CHUNK,
        add_bos_token: bool | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        tokenizer: str | None = None,
        **settings,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.model, self.tokenizer = load_model(pretrained, DTYPES[dtype], weights)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # the harness's command line asks for cuda unless told otherwise; its `hf` model falls back too
            logging.getLogger(__name__).warning("no CUDA device here: lminf runs on the CPU.")
        elif device not in (None, "cpu"):
            self.model.to(device)
        if strategy == VANILLA:
            if settings:
                raise ValueError(f"strategy vanilla takes no settings, got {', '.join(settings)}.")
        else:
            patch(self.model, strategy, **settings)
        self.strategy, self.chunk_size, self.add_bos_token = strategy, chunk_size, add_bos_token

    # -- tokens --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling document starts from: BOS, else EOS (as `hf`)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # as `hf`: the model's own rule unless add_bos_token is given
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache() if self.strategy == VANILLA else make_cache(self.model)

    @torch.inference_mode()
    def continuation_logprobs(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it. The
        context goes through the cache without output logits; the continuation's positions get them."""
        ids = torch.tensor([context + continuation], device=self.model.device)
        cache, n, first = self.new_cache(), ids.shape[1], len(context) - 1
        begin_turn(cache, n - 1)  # one turn: a cache that evicts at turn boundaries (SirLLM's) scores it whole
        if first > 0:
            prefill(self.model, ids[:, :first], cache, chunk_size=self.chunk_size, turn=False)
        logprob, greedy = 0.0, True
        for a in range(first, n - 1, self.chunk_size):
            b = min(a + self.chunk_size, n - 1)
            logits = self.model(ids[:, a:b], **cache_kwarg(self.model, cache), use_cache=True).logits[0].float()
            targets = ids[0, a + 1 : b + 1]
            logprob += float(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum())
            greedy = greedy and bool((logits.argmax(-1) == targets).all())
        return logprob, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [
            self.continuation_logprobs(context, continuation)
            for _, context, continuation in tqdm(requests, desc="lminf loglikelihood", disable=disable_tqdm)
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood, every token given all before it, in one pass from the prefix token."""
        out = []
        for request in tqdm(requests, desc="lminf rolling loglikelihood", disable=disable_tqdm):
            ids = torch.tensor([[self.prefix_token_id, *self.tok_encode(request.args[0])]], device=self.model.device)
            cache = self.new_cache()
            begin_turn(cache, ids.shape[1] - 1)
            out.append(-float(token_nll(self.model, ids, cache, self.chunk_size, progress=False).double().sum()))
        return out

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.greedy_until(*r.args) for r in tqdm(requests, desc="lminf generate", disable=disable_tqdm)]

    def greedy_until(self, context: str, gen_kwargs: dict) -> str:
        """Greedy text after `context`, cut before the first of gen_kwargs' `until` strings."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tok_decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks", 256))
        if kwargs.pop("do_sample", False) and kwargs.get("temperature", 0.0) > 0:
            raise ValueError("lminf's harness model decodes greedily; run the task with do_sample=false.")
        ids = torch.tensor([self.tok_encode(context)], device=self.model.device)
        if ids.shape[1] == 0:
            ids = torch.tensor([[self.prefix_token_id]], device=self.model.device)
        cache = self.new_cache()
        begin_turn(cache, ids.shape[1] + max_new)
        prefill(self.model, ids[:, :-1], cache, chunk_size=self.chunk_size, turn=False)
        step, token, out = decoder(self.model, cache), ids[:, -1:], []
        for _ in range(max_new):
            token = step(token).argmax(-1, keepdim=True)
            out.append(int(token))
            text = self.tok_decode(out)
            if any(stop in text for stop in until):
                break
        text = self.tok_decode(out)
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


def cli() -> None:
    """The harness's own command line (sys.argv), this module's model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
