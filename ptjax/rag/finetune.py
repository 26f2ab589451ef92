"""Retrieval-augmented fine-tuning data: SFT records whose prompts carry retrieved passages.

Each question's prompt holds k passages: the retriever's top k with the gold passage put in if
the retriever missed it (in place of the lowest-ranked non-gold one), the rest being the
retriever's own hard distractors, in shuffled order so the model cannot learn a position; the
completion is the answer cited by the gold passage's number. Trained with the ordinary SFT
trainer (`ptjax.train.trainer.train` on `encode_sft` of these records), the model learns to find
the passage about the question's subject and copy from it.
"""

from __future__ import annotations

import numpy as np

from ptjax.rag.corpus import Passage
from ptjax.rag.prompt import INSTRUCTION, TEMPLATE, build_prompt, chat_turns, cite


def passages_with_gold(rows, passages: list[Passage], gold_ids: tuple[str, ...], k: int,
                       rng: np.random.Generator, by_id: dict[str, Passage] | None = None,
                       shuffle: bool = True) -> tuple[list[Passage], int]:
    """(k passages in shuffled order, the 1-based number of the gold one): the retrieved rows
    `rows`, the first gold passage swapped in for the last non-gold one when none is retrieved
    (`by_id` maps ids to passages; built from `passages` when not given)."""
    chosen = [passages[r] for r in rows[:k] if r >= 0]
    gold_set = set(gold_ids)
    if not any(p.id in gold_set for p in chosen):
        by_id = by_id if by_id is not None else {p.id: p for p in passages}
        gold = next((by_id[g] for g in gold_ids if g in by_id), None)
        if gold is None:
            raise ValueError(f"gold passage(s) {sorted(gold_set)} not in the corpus")
        chosen = chosen[:k - 1] + [gold]
    if shuffle:
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    number = next(i for i, p in enumerate(chosen, start=1) if p.id in gold_set)
    return chosen, number


def rag_sft_records(questions: list[str], answers: list[str], gold_ids: list[tuple[str, ...]],
                    rows: np.ndarray, passages: list[Passage], k: int, *, seed: int = 0,
                    template: str = TEMPLATE, instruction: str = INSTRUCTION,
                    shuffle: bool = True, chat: bool = False) -> list[dict]:
    """`{"prompt", "completion"}` records for the SFT trainer: the numbered prompt of k passages
    (gold included, distractors from `rows`, the retriever's results) and `answer [n]`; with
    `chat`, `{"messages"}` records of the same turns `encode_rag_prompt` gives a chat model,
    the cited answer as the assistant turn."""
    if not len(questions) == len(answers) == len(gold_ids) == len(rows):
        raise ValueError("questions, answers, gold_ids and rows must have one entry per question")
    rng = np.random.default_rng(seed)
    by_id = {p.id: p for p in passages}
    records = []
    for q, a, gold, row in zip(questions, answers, gold_ids, rows):
        chosen, number = passages_with_gold(row, passages, gold, k, rng, by_id, shuffle)
        if chat:
            turns = chat_turns(q, chosen, instruction) + [("assistant", cite(a, number))]
            records.append({"messages": [{"role": r, "content": c} for r, c in turns]})
        else:
            records.append({"prompt": build_prompt(q, chosen, template, instruction),
                            "completion": cite(a, number)})
    return records
