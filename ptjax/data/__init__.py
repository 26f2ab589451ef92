"""Data for post-training: tokenizers, chat templates, validated JSONL readers, encoding with loss
masks, packing, resumable batch iterators and the synthetic tasks of the embedded demo."""

from ptjax.data.chat_template import render as render_chat_template
from ptjax.data.encode import encode_chat_prompt, encode_prompt, encode_sft, encode_sft_status
from ptjax.data.errors import DataError
from ptjax.data.iterator import (LazyExamples, PackedBatches, RowStream, eval_batches,
                                 stream_layout)
from ptjax.data.packing import pack
from ptjax.data.records import (
    ChatRecord,
    PreferenceRecord,
    SFTRecord,
    parse_sft_record,
    read_preference_jsonl,
    read_preference_jsonl_lines,
    read_prompts_jsonl,
    read_sft_jsonl,
    read_sft_jsonl_lines,
    write_jsonl,
)
from ptjax.data.synthetic import (
    TASKS,
    edit_distance,
    eval_set,
    grade,
    instruction_prompt,
    instruction_records,
    pretraining_texts,
    score,
)
from ptjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "ChatRecord",
    "DataError",
    "HFTokenizer",
    "LazyExamples",
    "PackedBatches",
    "PreferenceRecord",
    "RowStream",
    "SFTRecord",
    "Tokenizer",
    "encode_chat_prompt",
    "encode_prompt",
    "encode_sft",
    "encode_sft_status",
    "eval_batches",
    "edit_distance",
    "eval_set",
    "grade",
    "instruction_prompt",
    "instruction_records",
    "load_tokenizer",
    "pack",
    "parse_sft_record",
    "pretraining_texts",
    "read_preference_jsonl",
    "read_preference_jsonl_lines",
    "read_prompts_jsonl",
    "read_sft_jsonl",
    "read_sft_jsonl_lines",
    "render_chat_template",
    "score",
    "stream_layout",
    "train_bpe",
    "write_jsonl",
]
