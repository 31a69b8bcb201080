"""`potluck chat`: a conversation kept in one inference session, so each turn sends the nodes only
its new tokens.

The conversation fits the session's length (--max-length, at most the model's positions): a
message that would not fit is refused in one line and the chat goes on; a reply is cut where the
conversation is full, and says so. Ctrl-C during a reply stops that reply (what came of it stays
in the conversation); Ctrl-C at the prompt, an empty line or Ctrl-D ends the chat. Input that is
not UTF-8 has its bad bytes replaced, as in the reply's text.
"""
from __future__ import annotations

import contextlib
import logging
import sys

from potluck.protocol.errors import BadRequest

DEFAULT_LENGTH = 4096


def chat_length(requested: int | None, config) -> int:
    """The session's length: ``requested`` (--max-length), or the model's positions up to
    ``DEFAULT_LENGTH``; BadRequest if more than the model has."""
    positions = getattr(config, "max_position_embeddings", None)
    if requested is None:
        return min(DEFAULT_LENGTH, positions or DEFAULT_LENGTH)
    if positions and requested > positions:
        raise BadRequest(f"--max-length {requested} is more than the model's {positions} positions")
    return requested


def as_text(raw: str) -> str:
    """``raw`` as text a tokenizer takes: bytes that were not UTF-8 (which Python keeps as lone
    surrogates in argv and stdin) become U+FFFD."""
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def line_streamer(tokenizer, **options):
    """A transformers ``TextStreamer`` that is also a logging filter: a log line (a failover, a
    redone step) printed while text streams to the terminal starts on a line of its own instead of
    in the middle of the text. ``midline``: whether the text printed last ended its line."""
    from transformers import TextStreamer

    class LineStreamer(TextStreamer, logging.Filter):
        midline = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(text, stream_end)
            if text or stream_end:
                self.midline = not stream_end and not text.endswith("\n")

        def filter(self, record: logging.LogRecord | None) -> bool:
            if self.midline:
                print(flush=True)
                self.midline = False
            return True

    return LineStreamer(tokenizer, **options)


@contextlib.contextmanager
def streaming_apart_from_logs(streamer):
    """A context in which ``streamer`` (``line_streamer``) filters every root log handler; an
    error leaving it starts a new line too (the CLI prints it after)."""
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(streamer)
    try:
        yield streamer
    except BaseException:
        streamer.filter(None)
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(streamer)


def run_chat(model, tokenizer, length: int, max_new_tokens: int, system: str | None, sampling: dict) -> None:
    streamer = line_streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with streaming_apart_from_logs(streamer):
        _chat(model, tokenizer, length, max_new_tokens, system, sampling, streamer)


COMMANDS = """/reset          start a new conversation (the system prompt stays)
/system [TEXT]  set the system prompt (none without TEXT) and start a new conversation
/exit           end the chat (as an empty line or Ctrl-D does)
/help           this list; a message that starts with / is sent as text when it starts with //"""


def _chat(model, tokenizer, length: int, max_new_tokens: int, system: str | None, sampling: dict, streamer) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("Chatting through the swarm. Empty line or Ctrl-D ends; Ctrl-C stops a reply; /help lists commands.",
          file=sys.stderr)
    with model.inference_session(max_length=length) as session:
        while True:
            try:
                text = as_text(input("you> ")).strip()
            except EOFError:
                print(file=sys.stderr)  # the shell's prompt on a line of its own
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                raise
            if not text:
                return
            if text.startswith("/") and not text.startswith("//"):
                command, _, argument = text.partition(" ")
                if command in ("/exit", "/quit"):
                    return
                if command == "/reset":
                    messages = [m for m in messages if m["role"] == "system"]
                    print("(a new conversation)", file=sys.stderr)
                elif command == "/system":
                    messages = [{"role": "system", "content": argument.strip()}] if argument.strip() else []
                    print("(a new conversation, " + ("with that system prompt)" if messages else "no system prompt)"),
                          file=sys.stderr)
                elif command == "/help":
                    print(COMMANDS, file=sys.stderr)
                else:
                    print(f"potluck chat: {command} is not a command (/help lists them; start a message with // to "
                          "send it as text)", file=sys.stderr)
                continue  # the nodes' caches are rewound to what the next message shares with them
            messages.append({"role": "user", "content": text[1:] if text.startswith("//") else text})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            room = length - ids.shape[1]
            if room < 1:
                messages.pop()
                print(f"potluck chat: with this message the conversation would be {ids.shape[1]} tokens, over its "
                      f"{length} (--max-length); send a shorter one, or start again with a larger --max-length",
                      file=sys.stderr)
                continue
            print("model> ", end="", flush=True)
            streamer.midline = True
            new = min(max_new_tokens, room)
            try:
                out = model.generate(ids, max_new_tokens=new, streamer=streamer, **sampling)
                reply, stopped = out[0, ids.shape[1]:], False
            except KeyboardInterrupt:
                held = session.token_ids
                reply, stopped = (held[0, ids.shape[1]:] if held is not None else ids[0, :0]), True
                streamer.end()
            messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
            if stopped:
                print("\n(stopped; Ctrl-C at the prompt ends the chat)", file=sys.stderr)
            elif new < max_new_tokens and len(reply) >= new:
                print(f"\n(the conversation is full: {length} tokens, --max-length)", file=sys.stderr)
