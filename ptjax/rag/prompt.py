"""Retrieval-augmented prompts: numbered passages, the question, and citations read back.

The passages are numbered `[1] ... [2] ...` in the prompt; the model is asked (and, after
retrieval-augmented fine-tuning, trained) to end its answer with the number of the passage it
used, `Trosk [2]`. `parse_answer` splits such a reply into the answer text and the cited
passages. Plain models get the template as text; chat models get it as a system turn and a user
turn rendered with their own chat template (`ptjax.data.encode_chat_prompt`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ptjax.data.encode import encode_chat_prompt, encode_prompt
from ptjax.rag.corpus import Passage

INSTRUCTION = ("Answer the question using the passages below, and cite the passage you used "
               "by its number, like [1].")
TEMPLATE = "{instruction}\n{passages}\nQuestion: {question}\nAnswer: "
CITATION = re.compile(r"\[(\d+)\]")


def format_passages(passages: Sequence[Passage]) -> str:
    """`[1] title: text` lines, one per passage, numbered from 1 in the given order."""
    return "\n".join(f"[{i}] " + (f"{p.title}: " if p.title else "") + p.text
                     for i, p in enumerate(passages, start=1))


def build_prompt(question: str, passages: Sequence[Passage], template: str = TEMPLATE,
                 instruction: str = INSTRUCTION) -> str:
    """The plain-text prompt: `template` with `{instruction}`, `{passages}` (numbered, one per
    line) and `{question}` filled in; an empty passage list gives an empty `{passages}`."""
    return template.format(instruction=instruction, passages=format_passages(passages),
                           question=question)


def chat_turns(question: str, passages: Sequence[Passage],
               instruction: str = INSTRUCTION) -> list[tuple[str, str]]:
    """The prompt as chat turns: the instruction as the system turn, the numbered passages and
    the question as the user turn (what chat models get, at inference and in fine-tuning)."""
    user = f"{format_passages(passages)}\n\nQuestion: {question}"
    return [("system", instruction), ("user", user)]


def encode_rag_prompt(question: str, passages: Sequence[Passage], tokenizer,
                      template: str = TEMPLATE, instruction: str = INSTRUCTION) -> np.ndarray:
    """Token ids of the prompt for generation: the chat template (`chat_turns`) when the
    tokenizer has one, else `template`."""
    if tokenizer.chat_template is not None:
        return encode_chat_prompt(chat_turns(question, passages, instruction), tokenizer)
    return encode_prompt(build_prompt(question, passages, template, instruction), tokenizer)


def cite(answer: str, number: int) -> str:
    """`answer [number]`: the reply a retrieval-augmented fine-tuned model learns to write."""
    return f"{answer} [{number}]"


def parse_answer(reply: str, passages: Sequence[Passage]) -> tuple[str, list[str]]:
    """(the reply without its citation marks, the ids of the passages it cites, in order, once
    each); numbers outside 1..len(passages) are dropped, not guessed."""
    cited = []
    for m in CITATION.finditer(reply):
        i = int(m.group(1))
        if 1 <= i <= len(passages) and passages[i - 1].id not in cited:
            cited.append(passages[i - 1].id)
    return " ".join(CITATION.sub("", reply).split()), cited
