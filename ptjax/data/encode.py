"""Records to token ids plus a per-token loss mask.

The mask marks the tokens the model must *predict* (the mask sits on the token itself, not on the
position that predicts it); `packing.pack` shifts it onto targets. This module is the only place
that decides where BOS, EOS and chat role headers go, so training and generation agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptjax.data.records import ChatRecord, SFTRecord, parse_sft_record
from ptjax.data.tokenizer import Tokenizer


def _role_header(role: str) -> str:
    """The text that opens a chat turn; never part of the loss."""
    return f"<|{role}|>\n"


def encode_sft(
    record: SFTRecord | ChatRecord | dict, tokenizer: Tokenizer, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(ids int32 [n], loss_mask bool [n])` for one SFT or chat record, at most `max_len` long.

    Prompt/completion: `[bos] + prompt + completion + [eos]`, with the completion and the final EOS
    in the loss, so the model learns the answer and when to stop. Chat: `[bos]`, then per message a
    role header, the content and an EOS; content and EOS are in the loss only for assistant turns.
    Over-long sequences keep their beginning, the part every later token is conditioned on.
    A dict is accepted and validated as a record (in-memory data such as the synthetic demo's).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if isinstance(record, dict):
        record = parse_sft_record(record)
    ids = [tokenizer.bos_id]
    mask = [False]
    if isinstance(record, SFTRecord):
        prompt = tokenizer.encode(record.prompt)
        completion = tokenizer.encode(record.completion) + [tokenizer.eos_id]
        ids += prompt + completion
        mask += [False] * len(prompt) + [True] * len(completion)
    elif isinstance(record, ChatRecord):
        for role, content in record.messages:
            header = tokenizer.encode(_role_header(role))
            body = tokenizer.encode(content) + [tokenizer.eos_id]
            ids += header + body
            mask += [False] * len(header) + [role == "assistant"] * len(body)
    else:
        raise TypeError(f"expected an SFTRecord, ChatRecord or dict, got {type(record).__name__}")
    return np.asarray(ids[:max_len], np.int32), np.asarray(mask[:max_len], bool)


def encode_prompt(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """`[bos] + text` as int32 ids: a prompt laid out as `encode_sft` lays it out in training."""
    return np.asarray([tokenizer.bos_id] + tokenizer.encode(text), np.int32)


def encode_chat_prompt(messages: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> np.ndarray:
    """int32 ids of a conversation so far followed by an open assistant header, for generation.

    Renders turns exactly as `encode_sft` does for `ChatRecord`, so a chat-tuned model sees at
    sampling time the layout it was trained on; the reply it generates ends with EOS.
    """
    ids = [tokenizer.bos_id]
    for role, content in messages:
        ids += tokenizer.encode(_role_header(role)) + tokenizer.encode(content) + [tokenizer.eos_id]
    ids += tokenizer.encode(_role_header("assistant"))
    return np.asarray(ids, np.int32)
