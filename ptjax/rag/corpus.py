"""Passages and questions for retrieval, read from JSONL with the same checks as training data.

Passages are `{"id": ..., "text": ...}` lines (optionally `"title"`); questions are
`{"question": ..., "answer": ...}` lines (optionally `"gold_ids"`, the passages that hold the
answer, for recall). Errors are `DataError`s naming the file, line and field, as for SFT data.
"""

from __future__ import annotations

import dataclasses
import os

from ptjax.data.errors import DataError
from ptjax.data.records import json_objects, string_field, type_name, write_jsonl


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable unit of text; `id` is the caller's key (a string: JSON ids may be numbers,
    which are kept as their decimal text)."""

    id: str
    text: str
    title: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text} | ({"title": self.title} if self.title else {})


@dataclasses.dataclass(frozen=True)
class Question:
    """An evaluation question, its reference answer and the ids of the passages that hold it."""

    question: str
    answer: str = ""
    gold_ids: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "gold_ids": list(self.gold_ids)}


def _id_field(obj: dict, key: str, field: str, path, line) -> str:
    """An id: a string or an integer (booleans refused), kept as text."""
    if key not in obj:
        raise DataError(path, f"missing field '{field}'", line)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, f"field '{field}': expected a string or integer id, got "
                        f"{type_name(value)}", line)
    return str(value)


def read_passages_jsonl(path: str | os.PathLike) -> list[Passage]:
    """Every passage of a JSONL file, validated up front; duplicate ids are an error (an index
    maps each id to one row, and a repeated id would make recall ambiguous)."""
    passages, seen = [], {}
    for line, obj in json_objects(path):
        pid = _id_field(obj, "id", "id", path, line)
        if pid in seen:
            raise DataError(path, f"field 'id': duplicate id {pid!r} (first on line {seen[pid]})",
                            line)
        seen[pid] = line
        title = string_field(obj, "title", "title", path, line) if "title" in obj else ""
        passages.append(Passage(pid, string_field(obj, "text", "text", path, line), title))
    return passages


def read_questions_jsonl(path: str | os.PathLike) -> list[Question]:
    """Every question of a JSONL file: `question` (required), `answer` and `gold_ids` (optional)."""
    questions = []
    for line, obj in json_objects(path):
        text = string_field(obj, "question", "question", path, line)
        answer = string_field(obj, "answer", "answer", path, line) if "answer" in obj else ""
        gold = obj.get("gold_ids", [])
        if not isinstance(gold, list):
            raise DataError(path, f"field 'gold_ids': expected a list, got {type_name(gold)}",
                            line)
        ids = tuple(_id_field({"g": g}, "g", f"gold_ids[{i}]", path, line)
                    for i, g in enumerate(gold))
        questions.append(Question(text, answer, ids))
    return questions


def write_passages_jsonl(path: str | os.PathLike, passages: list[Passage]) -> None:
    """Passages as JSONL, readable by `read_passages_jsonl` (the index keeps its texts this way)."""
    write_jsonl(path, [p.as_dict() for p in passages])
