"""Retrieval-augmented generation: a passage index (dense, exact or IVF, sharded over devices;
BM25 beside it), embeddings from the model's own states with an optional contrastive head,
numbered-passage prompts with citations, and SFT records for retrieval-augmented fine-tuning.

`bm25s` is imported only when a BM25 index is built."""

from ptjax.rag.bm25 import BM25
from ptjax.rag.corpus import (Passage, Question, read_passages_jsonl, read_questions_jsonl,
                              write_passages_jsonl)
from ptjax.rag.encoder import (apply_head, embed_texts, fingerprint, info_nce, mean_pool,
                               train_head)
from ptjax.rag.finetune import passages_with_gold, rag_sft_records
from ptjax.rag.index import Index
from ptjax.rag.ivf import IVFLayout, build_layout, ivf_topk, kmeans, recall
from ptjax.rag.pipeline import (BM25Retriever, DenseRetriever, answer_questions,
                                build_dense_index, recall_at_k)
from ptjax.rag.prompt import build_prompt, cite, encode_rag_prompt, format_passages, parse_answer
from ptjax.rag.search import exact_topk, shard_rows, sharded_topk

__all__ = [
    "BM25", "BM25Retriever", "DenseRetriever", "IVFLayout", "Index", "Passage", "Question",
    "answer_questions", "apply_head", "build_dense_index", "build_layout", "build_prompt",
    "cite", "embed_texts", "encode_rag_prompt", "exact_topk", "fingerprint", "format_passages",
    "info_nce", "ivf_topk", "kmeans", "mean_pool", "parse_answer", "passages_with_gold",
    "rag_sft_records", "read_passages_jsonl", "read_questions_jsonl", "recall", "recall_at_k",
    "shard_rows", "sharded_topk", "train_head", "write_passages_jsonl",
]
