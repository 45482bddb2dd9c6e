"""Chat and serving: conversations that keep their bounded cache between turns.

    session.py     Session, ReplyText, stream_tokens, Turn (one chat turn, shared by `lminf chat`
                   and the server), SessionStore (idle conversations, reused by text prefix)
    scheduler.py   Job, Worker: the one thread that owns the model, one step per job in turn
    engine.py      Engine: model + tokenizer + session store + scheduler; prompts in, events out
    openai_api.py  request schemas, OpenAI-style errors, the FastAPI app (`lminf serve`)

Imports run one way: openai_api -> engine -> scheduler, session; nothing here imports the CLI.
"""
