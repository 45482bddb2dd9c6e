"""Generation that keeps its cache between calls: chats append tokens, never re-encode.

A `Session` is a token history and the bounded `LambdaCache` that has seen it. Its first
`n_global` tokens (a chat's system prompt and template prefix) stay attended for ever.
`stream_tokens` is a generator doing one bounded piece of work per `next()` (a prefill
chunk or one decoded token), so a scheduler can interleave many sessions fairly.
`Turn` is one conversation turn on a session (prompt in, reply text out, reply recorded),
shared by `lminf chat` and the server. `SessionStore` keeps a few sessions, least recently
used evicted, and hands back the one whose history is the longest prefix of a new prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, TopPLogitsWarper

from lminf.caches.turn_cache import begin_turn
from lminf.generation import cache_kwarg, decoder
from lminf.patching import make_cache, settings_of


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


class Session:
    """Tokens given to the model so far and the text they spell; the last sampled token
    is fed at the next call. Sessions are matched by text, not tokens: a reply re-tokenized
    by a chat template rarely gives back the exact tokens the model sampled."""

    def __init__(self, model: PreTrainedModel, n_global: int):
        self.n_global = n_global
        self.cache = make_cache(model, n_global=n_global)
        self.tokens: list[int] = []
        self.text = ""
        self.fed = 0  # tokens[:fed] are in the cache

    def take_text(self, text: str, tokenizer, add_special_tokens: bool = False) -> list[int]:
        """Tokens for the part of `text` past `self.text` (which `text` must extend); records it."""
        if not text.startswith(self.text):
            raise ValueError("the new text does not extend this session's text.")
        unseen, self.text = text[len(self.text) :], text
        return tokenizer(unseen, add_special_tokens=add_special_tokens)["input_ids"]

    def take_reply(self, tokenizer, generated: list[int]) -> None:
        """Record sampled tokens as text, special tokens too: a chat template writes them back."""
        self.text += tokenizer.decode(generated)

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()


class ReplyText:
    """The text of a growing list of sampled tokens, at O(1) cost per token.

    Decoding the whole reply after every token is O(n^2) over a long reply. Instead each
    step decodes a few tokens of context plus the new ones and keeps the difference, which
    is what a full decode would add (context keeps a SentencePiece word-start space right);
    a token that ends inside a multi-byte character waits for the next one."""

    def __init__(self, tokenizer, context: int = 4):
        self.tokenizer, self.context = tokenizer, context
        self.tokens: list[int] = []
        self.text = ""
        self._done = 0  # tokens whose text is in self.text

    def add(self, token: int) -> str:
        """Append a token -> the text it completes ("" while a character is unfinished)."""
        self.tokens.append(token)
        start = max(0, self._done - self.context)
        before = self.tokenizer.decode(self.tokens[start : self._done], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[start:], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self._done = len(self.tokens)
        new = after[len(before) :]
        self.text += new
        return new


@torch.inference_mode()
def stream_tokens(
    model: PreTrainedModel,
    session: Session,
    new_tokens: list[int],
    sampling: Sampling,
    stop_ids: set[int],
    chunk_size: int = 512,
) -> Iterator[int | None]:
    """Append `new_tokens`, then sample. Yields None after each prefill chunk and each
    sampled token id after that; stops after a stop token or max_new_tokens."""
    session.tokens.extend(new_tokens)
    begin_turn(session.cache, len(session.tokens) - session.fed + sampling.max_new_tokens)  # a request is a turn
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None
    step = decoder(model, session.cache, session.n_global)  # one token: the fast step where it applies
    for _ in range(sampling.max_new_tokens):
        while session.fed < len(session.tokens):
            a, b = session.fed, min(session.fed + chunk_size, len(session.tokens))
            ids = torch.tensor([session.tokens[a:b]], device=device)
            if b - a == 1:
                scores = step(ids)
            else:
                cache = cache_kwarg(model, session.cache)
                scores = model(ids, **cache, lminf_n_global=session.n_global, logits_to_keep=1).logits[:, -1].float()
            session.fed = b
            if b < len(session.tokens):
                yield None
        if sampling.temperature > 0:
            scores = scores / sampling.temperature
            if top_p is not None:
                scores = top_p(None, scores)
            token = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        else:
            token = int(scores.argmax(-1))
        session.tokens.append(token)
        yield token
        if token in stop_ids:
            return


class Turn:
    """One turn of a conversation on `session`, shared by `lminf chat` and the server.

    The constructor takes the prompt text into the session (only the part past the session's
    text is tokenized); `steps()` feeds and samples through `stream_tokens`, one bounded step
    per `next()`, and yields the reply text that became final at that step. Text is held back
    while a character is unfinished or could be the start of a stop string; the reply ends
    before the first stop string. When `steps()` ends or is closed, the sampled tokens are
    recorded into the session, so the next turn continues from them. Closing it between two
    steps (a cancelled request) leaves the cache consistent with the session's tokens."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        session: Session,
        prompt: str,
        sampling: Sampling,
        stop_ids: set[int],
        stops: Sequence[str] = (),
        add_special_tokens: bool = False,
    ):
        self.model, self.tokenizer, self.session = model, tokenizer, session
        self.sampling, self.stop_ids = sampling, stop_ids
        self.stops = [x for x in stops if x]
        self.cached_tokens = len(session.tokens)  # reused, not encoded again
        self._new_tokens = session.take_text(prompt, tokenizer, add_special_tokens)
        self.prompt_tokens = self.cached_tokens + len(self._new_tokens)
        self.reply = ReplyText(tokenizer)
        self.text = ""  # the reply text yielded so far (all of it once steps() has ended)
        self.finish_reason = "length"  # or "stop": a stop token or a stop string

    @property
    def completion_tokens(self) -> int:
        return len(self.reply.tokens)

    def steps(self) -> Iterator[str]:
        """One step per next(): a prefill chunk or one sampled token; yields the newly final
        text ("" for none). The last step yields what was held back, cut before a stop string."""
        try:
            for token in stream_tokens(self.model, self.session, self._new_tokens, self.sampling, self.stop_ids):
                if token is not None and self._add(token):
                    break
                yield self._release(self._ready())
            yield self._release(self._final_text())
        finally:
            self.session.take_reply(self.tokenizer, self.reply.tokens)

    def _add(self, token: int) -> bool:
        """Append a sampled token; True when the reply now holds a stop string."""
        new = self.reply.add(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        text, longest = self.reply.text, self._longest_stop()
        # A stop string not seen before ends in the new text: search only from there.
        lo = max(0, len(text) - len(new) - longest)
        if any(text.find(x, lo) >= 0 for x in self.stops):
            self.finish_reason = "stop"
            return True
        return False

    def _ready(self) -> str:
        """The reply text that can be given out: not half a character, nor what could be the
        start of a stop string."""
        text = self.reply.text
        if text.endswith("\ufffd"):
            return self.text
        return text[: max(0, len(text) - max(self._longest_stop() - 1, 0))]

    def _final_text(self) -> str:
        text = self.tokenizer.decode(self.reply.tokens, skip_special_tokens=True)
        cut = min((text.find(x) for x in self.stops if x in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def _release(self, text: str) -> str:
        """The part of `text` past what was yielded (which it extends when longer)."""
        if len(text) <= len(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new

    def _longest_stop(self) -> int:
        return max((len(x) for x in self.stops), default=0)


def pinned_prefix_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of the chat template before the first non-system message's content: the
    system prompt and the template's own prefix, which a chat pins as global tokens."""
    k = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    head = messages[:k]
    a = tokenizer.apply_chat_template([*head, {"role": "user", "content": "a"}], tokenize=True)
    b = tokenizer.apply_chat_template([*head, {"role": "user", "content": "b"}], tokenize=True)
    a, b = token_ids(a), token_ids(b)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def token_ids(encoded) -> list[int]:
    """Ids from apply_chat_template(tokenize=True), which returns a BatchEncoding in transformers 5."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


class SessionStore:
    """At most `capacity` idle sessions; memory is bounded by capacity x one bounded cache."""

    def __init__(self, model: PreTrainedModel, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}.")
        settings_of(model)  # the model must be patched
        self.model, self.capacity = model, capacity
        self._idle: OrderedDict[int, Session] = OrderedDict()

    def checkout(self, text: str, n_global: int) -> Session:
        """The idle session whose text is the longest prefix of `text` (removed from the
        store while in use), or a new one."""
        best_key, best_len = None, 0
        for key, session in self._idle.items():
            n = len(session.text)
            if session.n_global == n_global and n > best_len and text.startswith(session.text):
                best_key, best_len = key, n
        return Session(self.model, n_global) if best_key is None else self._idle.pop(best_key)

    def checkin(self, session: Session) -> None:
        self._idle[id(session)] = session
        self._idle.move_to_end(id(session))
        while len(self._idle) > self.capacity:
            self._idle.popitem(last=False)

    def clear(self) -> None:
        self._idle.clear()

    def __len__(self) -> int:
        return len(self._idle)

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self._idle.values())
