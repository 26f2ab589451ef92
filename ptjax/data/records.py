"""JSONL readers for SFT and preference data, validating every record as it is read.

Each reader returns plain frozen dataclasses, so everything downstream can trust the types, and
reports the first malformed record as a `DataError` naming the file, line and field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from ptjax.data.errors import DataError

CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """One supervised example: the model learns to produce `completion` after `prompt`."""

    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class ChatRecord:
    """A conversation of `(role, content)` pairs; the model learns the assistant turns."""

    messages: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred and a dispreferred response (reward modelling, DPO).

    Plain text (`prompt`, `chosen`, `rejected` strings), or chat form, where any of the three is
    a tuple of `(role, content)` turns (TRL's conversational layout: the prompt's turns, and the
    responses as assistant turns; a plain string there is one user or assistant turn).
    """

    prompt: str | tuple[tuple[str, str], ...]
    chosen: str | tuple[tuple[str, str], ...]
    rejected: str | tuple[tuple[str, str], ...]

    @property
    def is_chat(self) -> bool:
        return not all(isinstance(x, str) for x in (self.prompt, self.chosen, self.rejected))

    def as_sft(self, which: str) -> SFTRecord | ChatRecord:
        """The prompt followed by the `which` ("chosen" or "rejected") response, as the SFT
        record `encode_sft` lays out (so the response is exactly the loss-masked part)."""
        response = getattr(self, which)
        if not self.is_chat:
            return SFTRecord(prompt=self.prompt, completion=response)
        turns = lambda x, role: ((role, x),) if isinstance(x, str) else x  # noqa: E731
        return ChatRecord(messages=turns(self.prompt, "user") + turns(response, "assistant"))


def type_name(value: Any) -> str:
    """The JSON name of a value's type, as a user who wrote the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """`(line_number, object)` for each non-blank line of a JSONL file, 1-based. Every JSONL
    reader (SFT, preference pairs, the RAG corpus) goes through it, so all report alike.

    Lines are decoded one at a time so that bad UTF-8 and bad JSON are both reported at their line.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror})") from None
    count = 0
    with f:
        for line_number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 ({e.reason})", line_number) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
                raise DataError(path, problem, line_number) from None
            if not isinstance(obj, dict):
                problem = f"expected a JSON object, got {type_name(obj)}"
                raise DataError(path, problem, line_number)
            count += 1
            yield line_number, obj
    if count == 0:
        raise DataError(path, "file is empty (no records)")


def string_field(obj: dict, key: str, field: str, path, line: int | None) -> str:
    """`obj[key]`, required to be a string; `field` is the name used in error messages."""
    if key not in obj:
        raise DataError(path, f"missing field '{field}'", line)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, f"field '{field}': expected a string, got {type_name(value)}", line)
    return value


def _turns(messages: list, key: str, path, line: int | None) -> tuple[tuple[str, str], ...]:
    """`(role, content)` pairs of a JSON list of messages, each checked (`key` names the field)."""
    pairs = []
    for i, message in enumerate(messages):
        field = f"{key}[{i}]"
        if not isinstance(message, dict):
            problem = f"field '{field}': expected a JSON object, got {type_name(message)}"
            raise DataError(path, problem, line)
        role = string_field(message, "role", f"{field}.role", path, line)
        if role not in CHAT_ROLES:
            allowed = ", ".join(CHAT_ROLES)
            problem = f"field '{field}.role': unknown role {role!r} (allowed: {allowed})"
            raise DataError(path, problem, line)
        content = string_field(message, "content", f"{field}.content", path, line)
        pairs.append((role, content))
    return tuple(pairs)


def _chat_record(messages: Any, path, line: int | None) -> ChatRecord:
    """A validated `ChatRecord` from the JSON value of a `messages` field."""
    if not isinstance(messages, list):
        problem = f"field 'messages': expected a list, got {type_name(messages)}"
        raise DataError(path, problem, line)
    pairs = _turns(messages, "messages", path, line)
    if not any(role == "assistant" for role, _ in pairs):
        raise DataError(path, "field 'messages': no assistant message (nothing to train on)", line)
    return ChatRecord(messages=pairs)


def parse_sft_record(obj: Any, path: str | os.PathLike = "<record>", line: int | None = None):
    """A validated `SFTRecord` or `ChatRecord` from one decoded JSON object.

    Shared by the file reader and by callers holding records in memory (the synthetic demo data),
    so both get the same checks; `path`/`line` only label error messages.
    """
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type_name(obj)}", line)
    if "messages" in obj:
        return _chat_record(obj["messages"], path, line)
    if "prompt" not in obj and "completion" not in obj:
        problem = "missing field 'prompt' (a record needs 'prompt' and 'completion', or 'messages')"
        raise DataError(path, problem, line)
    prompt = string_field(obj, "prompt", "prompt", path, line)
    completion = string_field(obj, "completion", "completion", path, line)
    return SFTRecord(prompt=prompt, completion=completion)


def read_sft_jsonl(path: str | os.PathLike) -> list[SFTRecord | ChatRecord]:
    """All records of an SFT JSONL file: `{"prompt", "completion"}` or `{"messages": [...]}` lines.

    Validates everything up front, so a bad record fails the run before training, not hours in.
    Extra fields are ignored, so files carrying ids or metadata load unchanged.
    """
    return [parse_sft_record(obj, path, line) for line, obj in json_objects(path)]


def read_sft_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, SFTRecord | ChatRecord]]:
    """`(line number, record)` for every record of an SFT JSONL file, so that later stages
    (truncation reports) can name the line an example came from."""
    return [(line, parse_sft_record(obj, path, line)) for line, obj in json_objects(path)]


def _turns_or_text(obj: dict, key: str, path, line: int | None, assistant: bool):
    """`obj[key]` as a string, or as validated `(role, content)` turns when it is a list."""
    if key not in obj:
        raise DataError(path, f"missing field '{key}'", line)
    value = obj[key]
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        problem = f"field '{key}': expected a string or a list of messages, got {type_name(value)}"
        raise DataError(path, problem, line)
    turns = _turns(value, key, path, line)
    if not turns:
        raise DataError(path, f"field '{key}': empty list of messages", line)
    if assistant and not any(role == "assistant" for role, _ in turns):
        raise DataError(path, f"field '{key}': no assistant message (nothing to score)", line)
    return turns


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferenceRecord]:
    """All records of a preference JSONL file: `prompt`, `chosen`, `rejected`, each a string or
    (chat form) a list of `{"role", "content"}` messages, the responses holding assistant turns.

    Validated up front like `read_sft_jsonl`; `chosen == rejected` is allowed (it carries no
    preference signal but is not malformed).
    """
    return [record for _, record in read_preference_jsonl_lines(path)]


def read_preference_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, PreferenceRecord]]:
    """`(line number, record)` for every record of a preference JSONL file, so that truncation
    reports can name the line a pair came from."""
    return [(line, PreferenceRecord(
                prompt=_turns_or_text(obj, "prompt", path, line, assistant=False),
                chosen=_turns_or_text(obj, "chosen", path, line, assistant=True),
                rejected=_turns_or_text(obj, "rejected", path, line, assistant=True)))
            for line, obj in json_objects(path)]


def read_prompts_jsonl(path: str | os.PathLike) -> list[str]:
    """The `prompt` string of every record of a JSONL file (RL prompts: PPO, GRPO), validated
    up front like the other readers."""
    return [string_field(obj, "prompt", "prompt", path, line) for line, obj in json_objects(path)]


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept readable), creating parent folders.

    The demo and tests produce their data files with it, so they exercise the same readers a user's
    files go through.
    """
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
