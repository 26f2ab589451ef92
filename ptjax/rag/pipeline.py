"""Retrieve, then generate: retrievers with one interface, answers returned with their sources.

A retriever maps question strings to `(scores [q, k], rows [q, k])` over a list of passages:
`DenseRetriever` embeds the questions with the same encoder as the index (model states, optional
contrastive head) and searches the index exactly or through its IVF cells; `BM25Retriever` ranks
by term statistics. `answer_questions` retrieves k passages per question, builds the numbered
prompt, generates greedily and returns `{answer, passages: [{id, score, text}], citations}`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ptjax import sampling
from ptjax.rag import encoder
from ptjax.rag.bm25 import BM25
from ptjax.rag.corpus import Passage
from ptjax.rag.index import Index
from ptjax.rag.prompt import INSTRUCTION, TEMPLATE, encode_rag_prompt, parse_answer


@dataclasses.dataclass
class DenseRetriever:
    """Questions embedded by the model (`params`, `cfg`, `tokenizer`; its final or input
    embedding `states`, as the index was built) and `head`, searched in `index` by `method`
    ("exact" or "ivf" with `nprobe` cells)."""

    index: Index
    params: object
    cfg: object
    tokenizer: object
    head: dict | None = None
    method: str = "exact"
    nprobe: int = 8
    states: str = "final"

    @property
    def passages(self) -> list[Passage]:
        return self.index.passages

    def embed(self, texts: list[str]) -> np.ndarray:
        pooled = encoder.embed_texts(self.params, self.cfg, self.tokenizer, texts,
                                     states=self.states)
        return np.asarray(encoder.apply_head(self.head, pooled))

    def search(self, questions: list[str], k: int):
        return self.index.search(self.embed(questions), k, self.method, self.nprobe)


class BM25Retriever:
    """BM25 over the passages' titles and texts."""

    def __init__(self, passages: list[Passage]):
        self.passages = list(passages)
        self.bm25 = BM25([f"{p.title} {p.text}" if p.title else p.text for p in self.passages])

    def search(self, questions: list[str], k: int):
        return self.bm25.search(questions, k)


def build_dense_index(params, cfg, tokenizer, passages: list[Passage], head: dict | None = None,
                      dtype=np.float32, states: str = "final") -> Index:
    """Every passage embedded by the model (its final or input embedding `states`) and head,
    with the encoder's fingerprint kept in the index so queries are never scored against
    another encoder's vectors."""
    pooled = encoder.embed_texts(params, cfg, tokenizer, [p.text for p in passages],
                                 states=states)
    return index_of_pooled(pooled, passages, params, cfg, head, dtype, states)


def index_of_pooled(pooled, passages: list[Passage], params, cfg, head: dict | None = None,
                    dtype=np.float32, states: str = "final") -> Index:
    """`build_dense_index` for passages already pooled by `encoder.embed_texts(..., states)`
    (a caller that trains a head on the same pooled states embeds them once)."""
    emb = np.asarray(encoder.apply_head(head, pooled)).astype(dtype)
    info = {"kind": "mean_pooled" + ("" if states == "final" else f"_{states}")
                    + ("+contrastive_head" if head is not None else ""),
            "fingerprint": encoder.fingerprint(params, cfg, head, states)}
    return Index(emb, list(passages), info)


def recall_at_k(rows: np.ndarray, passages: list[Passage], gold_ids: list[tuple[str, ...]],
                k: int) -> float:
    """Fraction of questions with a gold passage among their first k retrieved rows."""
    if len(rows) != len(gold_ids):
        raise ValueError(f"{len(rows)} result rows but {len(gold_ids)} questions")
    hits = [bool(set(gold) & {passages[r].id for r in row[:k] if r >= 0})
            for row, gold in zip(rows, gold_ids)]
    return float(np.mean(hits))


def answer_questions(params, cfg, tokenizer, retriever, questions: list[str], k: int = 3, *,
                     template: str = TEMPLATE, instruction: str = INSTRUCTION,
                     max_new_tokens: int = 32, batch_size: int = 32) -> list[dict]:
    """Retrieval-augmented answers: k passages retrieved per question, the numbered prompt,
    greedy generation; each result is `{"answer", "reply", "passages": [{"id", "score",
    "text"}], "citations": [cited passage ids]}` (`reply` is the raw generated text)."""
    scores, rows = retriever.search(questions, k)
    results, encoded = [], []
    for q, srow, rrow in zip(questions, scores, rows):
        used = [retriever.passages[r] for r in rrow if r >= 0]
        encoded.append(encode_rag_prompt(q, used, tokenizer, template, instruction))
        results.append({"passages": [{"id": p.id, "score": float(s), "text": p.text}
                                     for p, s, r in zip(used, srow, rrow) if r >= 0],
                        "_used": used})
    replies = sampling.generate_from_ids(params, cfg, tokenizer, encoded,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    for result, reply in zip(results, replies):
        answer, cited = parse_answer(reply, result.pop("_used"))
        result.update(answer=answer, reply=reply, citations=cited)
    return results
