"""`llmkit chat`: a conversation with a model in the terminal, or one reply per line through a pipe.

The conversation is a record (system message, user/assistant messages, GenerationParams) kept here; the engine's
`session()` turns each turn's whole messages list into a reply and may reuse the KV state of the prefix it has
already computed (remote.py: the server does its own caching). Choices, documented in docs/chat.md:

- No -m: the first installed alias that can chat (smollm2-135m), not the default gemma3-270m, a base model
  that has no chat template; with none installed, exit 2 with how to install one.
- Ctrl-C during a reply stops it and keeps the part shown in the history (what is on screen is what the model
  sees next); at the prompt it discards the line; Ctrl-D (end of input) leaves with exit 0.
- On a terminal a line ending in a backslash continues on the next one (multi-line messages); input() with
  readline gives line editing and history. Through a pipe each line is one message and each reply is one line
  on stdout, its own line breaks written as \\n (and a backslash as \\\\); no prompt, no colour.
- Slash commands work in both; their output and the per-turn footer go to stderr. `//text` sends "/text".
  Through a pipe the exit code is 1 when a command or a turn failed (the session still went on).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmkit.cli import options, render
from llmkit.cli.inputs import load_model
from llmkit.engine import LoadOptions
from llmkit.errors import InvalidParams, LlmkitError, UnsupportedFeature
from llmkit.params import PARAM_NAMES, GenerationParams, cli_flags, names_of, parse_params

EPILOG = """Examples:

  llmkit chat                                   # smollm2-135m, the installed model that can chat

  llmkit chat -m smollm2-135m --system "Answer briefly." --temperature 0.3

  llmkit chat -m smollm2-135m --engine llama.cpp

  printf 'Hi!\\nWhat is a GPU?\\n' | llmkit chat -m smollm2-135m --greedy   # one reply per line

  llmkit chat -m http://127.0.0.1:8000/v1       # a model served by llmkit serve or any OpenAI-compatible server

In the chat: /help, /set temperature 0.3, /system Answer briefly., /save chat.json, Ctrl-C stops a reply,
Ctrl-D leaves.
"""

TRANSCRIPT_VERSION = 1  # the "llmkit_chat" field of a /save file
CONTINUATION = "\\"  # a terminal line ending in it continues on the next
ROLES = ("user", "assistant")
DEFAULT_WORD = "default"  # /set NAME default: back to the table's default

COMMANDS = (
    ("/system [TEXT]", "set the system message (alone: show it; /system - removes it)"),
    ("/set [NAME VALUE]", "set a generation parameter (alone: list them; VALUE default resets one)"),
    ("/clear", "forget the conversation (the system message and parameters stay)"),
    ("/save FILE", "write the transcript as JSON (messages, system, params)"),
    ("/load FILE", "replace the conversation, system message and parameters with a saved transcript"),
    ("/stats", "tokens, timings and cache use of this session"),
    ("/help", "this list"),
    ("/exit", "leave (also Ctrl-D)"),
)
HELP_NOTES = (
    "A line ending in \\ continues on the next. Ctrl-C stops a reply (the part shown stays in the history).",
    "//text sends a message that starts with /text.",
)


@dataclass
class Stats:
    """Totals over the session's turns, for /stats."""

    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    decode_rates: list[float] = field(default_factory=list)
    last_context: int = 0  # prompt + reply tokens of the last turn: how full the context is


@dataclass
class Conversation:
    """What a turn sends: the system message, the messages so far and the parameters."""

    params: GenerationParams
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def with_user(self, text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": text}]

    def transcript(self, model: str) -> dict[str, Any]:
        return {
            "llmkit_chat": TRANSCRIPT_VERSION,
            "model": model,
            "system": self.system,
            "params": self.params.model_dump(mode="json"),
            "messages": self.messages,
        }


@options.load_options("load", remote=True)
@options.generation_options("generation")  # the starting values; /set changes them during the session
def chat(
    *,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            autocompletion=options.complete_model,
            show_default=False,
            help="A model with a chat template: alias, Hub id, folder, .gguf file or http://host:port/v1 URL. "
            "Default: the first installed alias that can chat (smollm2-135m); the default model of the other "
            "commands, gemma3-270m, is a base model and cannot chat.",
        ),
    ] = None,
    system: Annotated[Optional[str], typer.Option("--system", show_default=False, help="The system message.")] = None,
    generation: dict[str, Any],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No stats line after each reply.")] = False,
    load: LoadOptions,
) -> None:
    """Talk with a model: history, streamed replies, /commands (/help); one reply per line when piped."""
    params = chat_params(parse_params(generation))
    reference = chat_model(model)
    engine = load_model(reference, load)
    try:
        from llmkit.models import is_url, no_chat_template

        if not is_url(reference) and not engine.info.has_chat_template:
            raise UnsupportedFeature(no_chat_template(engine.info.model, needed_by="llmkit chat"))
        conversation = Conversation(params, system or None)
        failed = ChatLoop(engine, conversation, quiet=quiet, terminal=sys.stdin.isatty()).run()
    finally:
        engine.close()
    if failed:
        raise typer.Exit(1)


def chat_model(model: str | None) -> str:
    """The model to load, checked before torch is imported: an alias without a chat template fails here."""
    from llmkit.models import ALIASES, DEFAULT_MODEL, alias_installed, check_model, no_chat_template, resolve

    if model is None:
        ready = [alias.name for alias in ALIASES.values() if alias.chat and alias_installed(alias)]
        if not ready:
            raise UnsupportedFeature(
                no_chat_template(f"{DEFAULT_MODEL} (the default, a base model)", needed_by="llmkit chat")
            )
        return ready[0]
    check_model(model)
    source = resolve(model)
    if source.kind == "alias" and not ALIASES[source.location].chat:
        raise UnsupportedFeature(no_chat_template(source.name, needed_by="llmkit chat"))
    return model


def chat_params(params: GenerationParams) -> GenerationParams:
    """A chat shows one reply per turn and has no constraint options."""
    if params.num_sequences != 1:
        raise InvalidParams("num_sequences must be 1 in a chat, which shows one reply per turn", field="num_sequences")
    return params


def param_names() -> dict[str, str]:
    """Every spelling /set takes -> the field: the name, with dashes, and the CLI's aliases (max_tokens, temp)."""
    names = {}
    for name in PARAM_NAMES:
        if name in names_of("constraint"):
            continue
        names[name] = name
        for flag in cli_flags(name):
            names[flag.lstrip("-").replace("-", "_")] = name
    return names


def set_param(params: GenerationParams, name: str, raw: str) -> GenerationParams:
    """`/set NAME VALUE`: the value read with the field's own type and checked with the CLI's messages."""
    from llmkit.explore import parse_value

    field_name = param_names().get(name.replace("-", "_"))
    if field_name is None:
        if name in names_of("constraint"):
            raise InvalidParams(f"{name} cannot be set in a chat", field=name)
        parse_params({name: raw})  # "unknown parameter ... (known: ...)", the CLI's sentence
        raise InvalidParams(f"unknown parameter {name}", field=name)
    values = params.model_dump()
    if raw.strip() == DEFAULT_WORD:
        values.pop(field_name)
    else:
        values[field_name] = parse_value(field_name, raw)
    return chat_params(parse_params(values))


def read_transcript(path: Path) -> Conversation:
    """A /save file back into a Conversation, every field checked before anything changes."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidParams(f"cannot read {path}: {exc.strerror}", field="transcript") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParams(f"{path} is not a JSON transcript ({exc})", field="transcript") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise InvalidParams(f'{path}: needs a JSON object with a "messages" list', field="transcript")
    messages = []
    for number, message in enumerate(record["messages"], start=1):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidParams(
                f'{path}: message {number} needs "role" (user or assistant) and "content" (a string)',
                field="transcript",
            )
        messages.append({"role": message["role"], "content": message["content"]})
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidParams(f'{path}: "system" must be a string or null', field="transcript")
    values = record.get("params") or {}
    if not isinstance(values, dict):
        raise InvalidParams(f'{path}: "params" must be an object', field="transcript")
    try:
        params = chat_params(parse_params(values))
    except InvalidParams as exc:
        raise InvalidParams(f"{path}: {exc}", field=exc.field) from None
    return Conversation(params, system or None, messages)


def one_line(text: str) -> str:
    """A reply through a pipe stays on one line: its line breaks become \\n, a backslash \\\\."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class ChatLoop:
    """Reads lines, runs slash commands and turns; `run` returns whether anything failed (a pipe's exit code)."""

    def __init__(self, engine, conversation: Conversation, *, quiet: bool, terminal: bool):
        self.engine = engine
        self.conversation = conversation
        self.quiet = quiet
        self.terminal = terminal
        self.session = engine.session()  # local engines keep the KV cache between turns
        self.stats = Stats()
        self.failed = False
        self.done = False

    # --- input ------------------------------------------------------------------------------

    def read_message(self) -> str | None:
        """The next message or command; None at end of input. On a terminal, `\\` at a line's end continues it."""
        if not self.terminal:
            line = sys.stdin.readline()
            if not line:
                return None
            return line[:-1] if line.endswith("\n") else line
        lines: list[str] = []
        while True:
            try:
                line = input(render.chat_prompt(continued=bool(lines)))
            except EOFError:
                render.end_text()
                return None
            except KeyboardInterrupt:  # at the prompt: drop what was typed, ask again
                render.end_text()
                lines = []
                continue
            if line.endswith(CONTINUATION):
                lines.append(line[: -len(CONTINUATION)])
                continue
            lines.append(line)
            return "\n".join(lines)

    def run(self) -> bool:
        if self.terminal:
            try:
                import readline  # noqa: F401  # line editing and in-session history for input()
            except ImportError:  # Windows: input() works without it
                pass
            render.chat_banner(self.engine.info.model, len(COMMANDS))
        while not self.done:
            text = self.read_message()
            if text is None:
                break
            if not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    self.command(text)
                else:
                    self.turn(text[1:] if text.startswith("//") else text)
            except LlmkitError as exc:
                render.error(str(exc))
                self.failed = True
            except KeyboardInterrupt:  # between a reply and the prompt (or before a reply began): not the session
                if not self.terminal:
                    raise
                render.end_text()
        return self.failed and not self.terminal

    # --- a turn -----------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        messages = self.conversation.with_user(text)
        generation = self.session.stream(messages, self.conversation.params, fit_context=True)
        pieces: list[str] = []
        try:
            for chunk in generation:
                pieces.append(chunk.text)
                render.text(chunk.text if self.terminal else one_line(chunk.text))
        except KeyboardInterrupt:
            generation.close()
            render.chat_stopped()
            self.session.reset()  # the engine's kept state may be half a turn: start clean next time
            reply = "".join(pieces)
            if reply:
                self.remember(text, reply)
            return
        render.end_text()
        result = generation.result
        self.remember(text, result.completions[0].text)
        cached = int(getattr(result.usage, "cached_tokens", 0) or 0)
        self.count(result, cached)
        if not self.quiet:
            render.chat_footer(result, cached)
        wanted = self.conversation.params.max_new_tokens
        if result.completions[0].finish_reason == "length" and result.usage.completion_tokens < wanted:
            render.chat_note(
                f"the reply was cut at the model's context of {self.engine.info.context_length} tokens "
                f"({result.usage.prompt_tokens} in the conversation): /clear starts over"
            )

    def remember(self, text: str, reply: str) -> None:
        self.conversation.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def count(self, result, cached: int) -> None:
        stats = self.stats
        stats.turns += 1
        stats.prompt_tokens += result.usage.prompt_tokens
        stats.cached_tokens += cached
        stats.generated_tokens += result.usage.completion_tokens
        stats.ttfts.append(result.timings.ttft_s)
        if result.timings.decode_tokens_per_s:
            stats.decode_rates.append(result.timings.decode_tokens_per_s)
        stats.last_context = result.usage.prompt_tokens + result.usage.completion_tokens

    # --- slash commands ---------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        handlers = {
            "/system": self.cmd_system,
            "/set": self.cmd_set,
            "/clear": self.cmd_clear,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/stats": self.cmd_stats,
            "/help": self.cmd_help,
            "/exit": self.cmd_exit,
            "/quit": self.cmd_exit,
        }
        handler = handlers.get(name.lower())
        if handler is None:
            raise InvalidParams(f"unknown command {name}; /help lists them (//text sends a message starting with /)")
        handler(rest)

    def cmd_system(self, rest: str) -> None:
        if not rest:
            current = self.conversation.system
            render.chat_note(f"system: {current}" if current else "no system message")
            return
        self.conversation.system = None if rest == "-" else rest
        render.chat_note("system message removed" if rest == "-" else "system message set")

    def cmd_set(self, rest: str) -> None:
        if not rest:
            defaults = GenerationParams()
            current = self.conversation.params
            render.chat_params(
                [
                    (name, json.dumps(getattr(current, name)), getattr(current, name) != getattr(defaults, name))
                    for name in PARAM_NAMES
                    if name not in names_of("constraint")
                ]
            )
            return
        name, _, raw = rest.partition(" ")
        if not raw.strip():
            raise InvalidParams(f"/set {name} needs a value: /set NAME VALUE (/set alone lists them)", field=name)
        self.conversation.params = set_param(self.conversation.params, name, raw.strip())
        field_name = param_names().get(name.replace("-", "_"), name)
        render.chat_note(f"{field_name} = {json.dumps(getattr(self.conversation.params, field_name))}")

    def cmd_clear(self, rest: str) -> None:
        self.conversation.messages = []
        self.session.reset()
        render.chat_note("conversation cleared")

    def cmd_save(self, rest: str) -> None:
        if not rest:
            raise InvalidParams("/save needs a file name: /save FILE", field="transcript")
        path = Path(rest).expanduser()
        record = self.conversation.transcript(self.engine.info.model)
        try:
            path.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise InvalidParams(f"cannot write {path}: {exc.strerror}", field="transcript") from None
        render.chat_note(f"saved {len(self.conversation.messages)} messages to {path}")

    def cmd_load(self, rest: str) -> None:
        if not rest:
            raise InvalidParams("/load needs a file name: /load FILE", field="transcript")
        self.conversation = read_transcript(Path(rest).expanduser())
        render.chat_note(f"loaded {len(self.conversation.messages)} messages from {rest}")

    def cmd_stats(self, rest: str) -> None:
        stats = self.stats
        context = self.engine.info.context_length
        mean = sum(stats.ttfts) / len(stats.ttfts) if stats.ttfts else None
        rate = sum(stats.decode_rates) / len(stats.decode_rates) if stats.decode_rates else None
        render.chat_stats(
            [
                ("model", self.engine.info.model),
                ("turns", str(stats.turns)),
                ("messages in history", str(len(self.conversation.messages))),
                ("prompt tokens", str(stats.prompt_tokens)),
                ("of them cached", str(stats.cached_tokens)),
                ("generated tokens", str(stats.generated_tokens)),
                ("TTFT last / mean", f"{stats.ttfts[-1] * 1000:.0f} / {mean * 1000:.0f} ms" if mean else "n/a"),
                ("decode speed mean", f"{rate:.1f} tok/s" if rate else "n/a"),
                ("context used", f"{stats.last_context} of {context or '?'} tokens"),
            ]
        )

    def cmd_help(self, rest: str) -> None:
        render.chat_help(COMMANDS, HELP_NOTES)

    def cmd_exit(self, rest: str) -> None:
        self.done = True
