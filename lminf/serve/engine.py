"""The serving engine: a patched model, its tokenizer, the conversation store and a scheduler.

It knows nothing of HTTP: `chat_prompt` takes plain {"role", "content"} dicts, `start`
queues one turn as a job whose events go to a callback, and `stats` reports memory and
load. `lminf.serve.openai_api` puts the OpenAI API in front of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from lminf.memory import peak_mib
from lminf.patching import settings_of
from lminf.serve.scheduler import Job, Scheduler, Worker
from lminf.serve.session import Sampling, Session, SessionStore, Turn, pinned_prefix_length


class Engine:
    """The model, its tokenizer, the conversation store and the scheduler (a started `Worker`
    unless one is given). Events of a job: ("delta", text)..., then ("done", info) or ("error", message)."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        max_sessions: int = 8,
        default_max_tokens: int = 256,
        scheduler: Scheduler | None = None,
    ):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.n_global = settings_of(model).n_global
        self.store = SessionStore(model, max_sessions)
        self.store_lock = threading.Lock()
        self.default_max_tokens = default_max_tokens
        self.stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if scheduler is None:
            scheduler = Worker()
            scheduler.start()
        self.worker = scheduler
        self.generated_tokens = 0

    def chat_prompt(self, messages: list[dict]) -> tuple[str, int]:
        """The prompt text, and how many of its first tokens to pin as global."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text, max(self.n_global, pinned_prefix_length(self.tokenizer, messages))
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:", self.n_global

    def start(
        self, prompt: str, n_global: int, sampling: Sampling, on_event: Callable[[tuple], None], chat: bool, stops: list[str]
    ) -> Job:
        """Queue a turn; `on_event` gets ("delta", text), then ("done", info) or ("error", message)."""
        job = Job(steps=None, on_event=on_event)
        job.steps = self._run(prompt, n_global, sampling, on_event, chat, stops)
        self.worker.submit(job)
        return job

    def _run(self, prompt, n_global, sampling, on_event, chat, stops) -> Iterator[None]:
        """The job's steps: a session from the store, one `Turn` on it, the session back."""
        with self.store_lock:
            session = self.store.checkout(prompt, n_global)
        # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (BOS) once.
        add_special = not chat and not session.tokens
        turn = Turn(self.model, self.tokenizer, session, prompt, sampling, self.stop_ids, stops, add_special)
        steps = turn.steps()
        consistent, counted = False, 0  # an error inside a forward pass may leave the cache half updated
        try:
            for text in steps:
                self.generated_tokens += turn.completion_tokens - counted
                counted = turn.completion_tokens
                if text:
                    on_event(("delta", text))
                yield
            on_event(("done", {"finish_reason": turn.finish_reason, "usage": usage(turn)}))
            consistent = True
        except GeneratorExit:  # cancelled between two steps: the cache is whole
            consistent = True
            raise
        finally:
            steps.close()  # records the reply into the session before anyone else can check it out
            if consistent:
                self._checkin(session)

    def _checkin(self, session: Session) -> None:
        with self.store_lock:
            self.store.checkin(session)

    def stats(self) -> dict:
        with self.store_lock:
            return {
                "sessions": len(self.store),
                "cache_bytes": self.store.memory_bytes(),
                "active_jobs": self.worker.active,
                "generated_tokens": self.generated_tokens,
                "peak_rss_bytes": int(peak_mib("cpu") * 2**20),
            }


def usage(turn: Turn) -> dict:
    """A turn's token counts in the OpenAI API's shape."""
    return {
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": turn.completion_tokens,
        "total_tokens": turn.prompt_tokens + turn.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": turn.cached_tokens},
    }
