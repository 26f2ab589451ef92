"""Records to token ids plus a per-token loss mask.

The mask marks the tokens the model must *predict* (the mask sits on the token itself, not on the
position that predicts it); `packing.pack` shifts it onto targets. This module is the only place
that decides where BOS, EOS and chat turns go, so training and generation agree.

Text is tokenized in one piece and the loss mask is found from character offsets, never by
tokenizing parts separately: BPE merges across a boundary (prompt "A: " then completion "yes" is
"A", ":", " yes" in running text), so separately tokenized parts give ids the model never saw in
pretraining. A token is in the loss iff it covers at least one character of the text to learn; so
a token straddling the boundary (that " yes") is learned rather than dropped, which would leave a
one-word answer with nothing but its EOS in the loss.

Chats use the tokenizer's own chat template when it has one, the format the model was tuned in.
Tokenizers without one (the byte tokenizer of the demo, base checkpoints) use a plain layout,
`<|role|>\\n` + content + EOS per turn, that needs no special tokens in the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptjax.data import chat_template
from ptjax.data import truncate as truncation
from ptjax.data.records import ChatRecord, SFTRecord, parse_sft_record
from ptjax.data.tokenizer import Tokenizer


def _role_header(role: str) -> str:
    """The text that opens a chat turn in the plain layout; never part of the loss."""
    return f"<|{role}|>\n"


def _bos(tokenizer: Tokenizer, text: str) -> list[int]:
    """`[bos_id]` when the tokenizer's sequences start with BOS and `text` does not write it itself.

    Llama 3's chat template renders `<|begin_of_text|>` as text, which tokenizes to BOS; adding
    another would give the double BOS the model never saw.
    """
    if not tokenizer.add_bos or (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return []
    return [tokenizer.bos_id]


def _render(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """`messages` rendered with the tokenizer's chat template and special-token texts."""
    return chat_template.render(
        tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        source=_template_source(tokenizer),
    )


def _template_source(tokenizer: Tokenizer) -> str:
    """How error messages name the chat template: by the tokenizer it came with."""
    return f"chat template of {tokenizer.source}"


def _as_dicts(messages: Sequence[tuple[str, str]]) -> list[dict]:
    """`(role, content)` pairs as the `{"role", "content"}` dicts chat templates read."""
    return [{"role": role, "content": content} for role, content in messages]


def _prefix_end(tokenizer: Tokenizer, messages: list[dict], generation_prompt: bool,
                full: str) -> int:
    """Length of the render of `messages` (a leading part of a chat), checked to prefix `full`.

    Locating turns by prefix renders is exact only for templates that never rewrite earlier turns
    once later ones exist; one that does (e.g. dropping reasoning from past turns) is reported
    rather than silently trained on misplaced masks.
    """
    text = _render(tokenizer, messages, generation_prompt)
    if not full.startswith(text):
        what = f"the first {len(messages)} message(s)"
        if generation_prompt:
            what += " with the generation prompt"
        raise ValueError(
            f"{_template_source(tokenizer)}: not prefix-consistent: rendering {what} does not give "
            f"the start of the whole conversation's render, so assistant turns cannot be located "
            f"in it ({text[-60:]!r} vs {full[max(0, len(text) - 60):len(text)]!r})"
        )
    return len(text)


def _covers(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool per token: does its `(start, end)` share a character with one of `spans`?

    An empty token (`start == end`, some tokenizers give these to pieces of a split character)
    counts as covering the character at `start`.
    """
    bounds = np.asarray(offsets, np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], np.maximum(bounds[:, 1], bounds[:, 0] + 1)
    mask = np.zeros(len(bounds), bool)
    for start, end in spans:
        mask |= (starts < end) & (ends > start)
    return mask


def _encode_templated_chat(record: ChatRecord, tokenizer: Tokenizer) -> tuple[list, list]:
    """Ids and loss mask of a chat rendered with the tokenizer's template, tokenized once.

    Assistant turn i spans the characters from the end of the render of the turns before it plus
    the generation prompt (its header) to the end of the render including it, so the loss covers
    the reply and the template's end-of-turn text (`<|im_end|>`, `<|eot_id|>`), which is what
    teaches the model to stop. A token is in the loss iff it covers a character of such a span. No
    EOS is appended: the template ends turns itself.
    """
    messages = _as_dicts(record.messages)
    full = _render(tokenizer, messages, False)
    spans = []
    for i, (role, _) in enumerate(record.messages):
        if role == "assistant":
            start = _prefix_end(tokenizer, messages[:i], True, full)
            end = _prefix_end(tokenizer, messages[: i + 1], False, full)
            if end < start:
                raise ValueError(f"{_template_source(tokenizer)}: assistant message {i} renders "
                                 "shorter than its own generation prompt")
            spans.append((start, end))
    ids, offsets = tokenizer.encode_with_offsets(full)
    bos = _bos(tokenizer, full)
    return bos + ids, [False] * len(bos) + _covers(offsets, spans).tolist()


def _encode_plain_chat(record: ChatRecord, tokenizer: Tokenizer) -> tuple[list, list]:
    """Ids and loss mask of a chat in the plain layout: per turn a role header, content and EOS.

    Content and EOS are in the loss only for assistant turns. Pieces are tokenized apart because
    the EOS between turns is an id, not text.
    """
    ids = _bos(tokenizer, "")
    mask = [False] * len(ids)
    for role, content in record.messages:
        header = tokenizer.encode(_role_header(role))
        body = tokenizer.encode(content) + [tokenizer.eos_id]
        ids += header + body
        mask += [False] * len(header) + [role == "assistant"] * len(body)
    return ids, mask


def _encode_prompt_completion(record: SFTRecord, tokenizer: Tokenizer) -> tuple[list, list]:
    """Ids and loss mask of `prompt + completion + EOS`, the joined text tokenized once.

    The loss covers the tokens holding completion text, and the EOS, so the model learns the
    answer and when to stop.
    """
    text = record.prompt + record.completion
    ids, offsets = tokenizer.encode_with_offsets(text)
    in_completion = _covers(offsets, [(len(record.prompt), len(text))]).tolist()
    bos = _bos(tokenizer, text)
    return bos + ids + [tokenizer.eos_id], [False] * len(bos) + in_completion + [True]


def encode_sft(
    record: SFTRecord | ChatRecord | dict, tokenizer: Tokenizer, max_len: int,
    truncate: str = "left",
) -> tuple[np.ndarray, np.ndarray] | None:
    """`(ids int32 [n], loss_mask bool [n])` for one SFT or chat record, at most `max_len` long.

    Prompt/completion: `prompt + completion` tokenized as one text, then EOS; the completion's
    tokens and the EOS are in the loss. Chat: rendered with the tokenizer's chat template and
    tokenized once, the assistant turns (with their end-of-turn tokens) in the loss; without a
    template, the plain `<|role|>` layout. BOS leads when the tokenizer's sequences start with it
    (`add_bos`) and the text does not already write it. Over-long sequences keep their completion:
    `truncate="left"` cuts the prompt from the left (after the BOS), `"drop"` returns None for
    them (`truncate.fit`; `encode_sft_status` also says which happened). A dict is accepted and
    validated as a record (in-memory data such as the synthetic demo's).
    """
    return encode_sft_status(record, tokenizer, max_len, truncate)[0]


def encode_sft_status(record, tokenizer: Tokenizer, max_len: int, truncate: str = "left"):
    """`(encode_sft's result, status)`, status "ok", "cut" or "dropped" (`truncate.fit`)."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if isinstance(record, dict):
        record = parse_sft_record(record)
    if isinstance(record, SFTRecord):
        ids, mask = _encode_prompt_completion(record, tokenizer)
    elif isinstance(record, ChatRecord):
        if tokenizer.chat_template is not None:
            ids, mask = _encode_templated_chat(record, tokenizer)
        else:
            ids, mask = _encode_plain_chat(record, tokenizer)
    else:
        raise TypeError(f"expected an SFTRecord, ChatRecord or dict, got {type(record).__name__}")
    head = 1 if ids[:1] == [tokenizer.bos_id] and tokenizer.add_bos else 0
    ids, mask, status = truncation.fit(ids, mask, max_len, truncate, head)
    return (None if ids is None else (ids, mask)), status


def encode_prompt(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """`text` laid out as `encode_sft` lays out a prompt, as int32 ids for generation.

    An empty prompt on a tokenizer that adds no BOS still gets `bos_id` (its EOS filler for
    GPT-2-style tokenizers), since a model needs one token to condition on.
    """
    ids = _bos(tokenizer, text) + tokenizer.encode(text)
    return np.asarray(ids or [tokenizer.bos_id], np.int32)


def encode_chat_prompt(messages: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> np.ndarray:
    """int32 ids of a conversation so far followed by an open assistant header, for generation.

    Renders the turns exactly as `encode_sft` does for `ChatRecord` (the chat template with its
    generation prompt, tokenized once; or the plain layout), so a chat-tuned model sees at sampling
    time the layout it was trained on; its reply ends with one of the tokenizer's `stop_ids`.
    """
    if tokenizer.chat_template is not None:
        text = _render(tokenizer, _as_dicts(messages), True)
        return np.asarray(_bos(tokenizer, text) + tokenizer.encode(text), np.int32)
    ids = _bos(tokenizer, "")
    for role, content in messages:
        ids += tokenizer.encode(_role_header(role)) + tokenizer.encode(content) + [tokenizer.eos_id]
    ids += tokenizer.encode(_role_header("assistant"))
    return np.asarray(ids, np.int32)
