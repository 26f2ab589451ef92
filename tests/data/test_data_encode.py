import numpy as np
import pytest

from ptjax.data import (
    ByteTokenizer,
    ChatRecord,
    SFTRecord,
    encode_chat_prompt,
    encode_prompt,
    encode_sft,
)

TOK = ByteTokenizer()
CHAT = ChatRecord(
    messages=(
        ("system", "be brief"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "and 3+3?"),
        ("assistant", "six ✓"),
    )
)


def test_sft_layout_and_mask():
    record = SFTRecord(prompt="Q: 1+1\nA: ", completion="2 é")
    ids, mask = encode_sft(record, TOK, max_len=100)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    prompt = list("Q: 1+1\nA: ".encode())
    completion = list("2 é".encode())
    assert ids.tolist() == [1] + [b + 3 for b in prompt + completion] + [2]
    assert mask.tolist() == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)
    assert ids[mask][-1] == TOK.eos_id
    assert TOK.decode(ids[mask]) == "2 é"


def test_sft_accepts_a_dict_and_truncates_from_the_right():
    full_ids, full_mask = encode_sft({"prompt": "abc", "completion": "de"}, TOK, max_len=100)
    assert full_mask.sum() == 3  # "d", "e", eos
    for max_len in (1, 4, 5, 7):
        ids, mask = encode_sft(SFTRecord("abc", "de"), TOK, max_len=max_len)
        np.testing.assert_array_equal(ids, full_ids[:max_len])
        np.testing.assert_array_equal(mask, full_mask[:max_len])
    with pytest.raises(ValueError):
        encode_sft(SFTRecord("a", "b"), TOK, max_len=0)


def test_chat_layout_and_mask():
    ids, mask = encode_sft(CHAT, TOK, max_len=1000)
    assert ids[0] == TOK.bos_id and not mask[0]
    # One EOS per message; only the assistant ones are predicted.
    eos = ids == TOK.eos_id
    assert eos.sum() == len(CHAT.messages)
    assert (eos & mask).sum() == 2
    # Decoding everything (specials skipped) gives the rendered conversation.
    assert TOK.decode(ids) == "".join(f"<|{role}|>\n{content}" for role, content in CHAT.messages)
    # The predicted tokens are exactly each assistant reply followed by EOS.
    expected = []
    for role, content in CHAT.messages:
        if role == "assistant":
            expected += TOK.encode(content) + [TOK.eos_id]
    assert ids[mask].tolist() == expected
    # Headers are never predicted, even the assistant's.
    header = TOK.encode("<|assistant|>\n")
    starts = [i for i in range(len(ids)) if ids[i : i + len(header)].tolist() == header]
    assert len(starts) == 2
    for s in starts:
        assert not mask[s : s + len(header)].any()
        assert mask[s + len(header)]


def test_prompt_encoders_match_training_layout():
    record = SFTRecord(prompt="Q: reverse abc\nA: ", completion="cba")
    ids, mask = encode_sft(record, TOK, max_len=100)
    prompt = encode_prompt(record.prompt, TOK)
    assert prompt.dtype == np.int32
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    assert not mask[: len(prompt)].any() and mask[len(prompt) :].all()

    ids, mask = encode_sft(CHAT, TOK, max_len=1000)
    prompt = encode_chat_prompt(CHAT.messages[:-1], TOK)
    np.testing.assert_array_equal(ids[: len(prompt)], prompt)
    header = len(TOK.encode("<|assistant|>\n"))
    assert TOK.decode(prompt[-header:]) == "<|assistant|>\n"
    assert not mask[len(prompt) - header : len(prompt)].any()
    assert TOK.decode(ids[len(prompt) :]) == "six ✓"
    assert mask[len(prompt) :].all()
