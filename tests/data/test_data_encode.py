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


def test_sft_accepts_a_dict_and_cuts_the_prompt_from_the_left():
    full_ids, full_mask = encode_sft({"prompt": "abc", "completion": "de"}, TOK, max_len=100)
    assert full_mask.sum() == 3  # "d", "e", eos
    bos, a, b, c, d, e, eos = full_ids.tolist()
    # By hand: BOS stays, prompt bytes go from the left; when even "de"+EOS does not fit after
    # the BOS, the answer's end goes; a window with no predictable loss token is no example.
    expected = {7: [bos, a, b, c, d, e, eos], 5: [bos, c, d, e, eos], 4: [bos, d, e, eos],
                3: [bos, d, e], 1: None}
    for max_len, want in expected.items():
        got = encode_sft(SFTRecord("abc", "de"), TOK, max_len=max_len)
        if want is None:
            assert got is None
            continue
        ids, mask = got
        assert ids.tolist() == want
        assert mask.tolist() == [False] + [i in (d, e, eos) for i in want[1:]]
    assert encode_sft(SFTRecord("abc", "de"), TOK, max_len=6, truncate="drop") is None
    np.testing.assert_array_equal(encode_sft(SFTRecord("abc", "de"), TOK, 7, "drop")[0], full_ids)
    with pytest.raises(ValueError):
        encode_sft(SFTRecord("a", "b"), TOK, max_len=0)
    with pytest.raises(ValueError, match="data.truncate"):
        encode_sft(SFTRecord("a", "b"), TOK, max_len=8, truncate="right")


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


# --- Hugging Face tokenizers with chat templates ---------------------------------------------
# Tiny byte-level BPE tokenizers trained here, saved as model folders the way SmolLM2-Instruct
# (ChatML, no BOS) and Llama 3 Instruct (BOS from the post-processor and from the template) are.

import json  # noqa: E402

import tokenizers  # noqa: E402
from test_chat_template import CHATML, LLAMA3  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from ptjax.data import HFTokenizer, render_chat_template  # noqa: E402

CORPUS = ["the answer is four", "hello there, how are you?", "be brief and say yes",
          "Answer: yes", "sum of two and two", "six is the answer ✓"] * 4
TURNS = (
    ("system", "Be brief."),
    ("user", "2+2?"),
    ("assistant", " four ✓ "),
    ("user", "and 3+3?"),
    ("assistant", "six\n"),
)
ENDS = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>"}


def _bpe_folder(folder, specials, config, post_processor=None):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = post_processor(tok) if post_processor else processors.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer.from_folder(folder), tok


def _llama3_post_processor(tok):
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    return processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                processors.TemplateProcessing(single=f"{bos[0]} $A",
                                                              special_tokens=[bos])])


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def templated(request, tmp_path_factory):
    """`(name, HFTokenizer, raw tokenizers.Tokenizer)` of a model folder with a chat template."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "chatml":
        tok, raw = _bpe_folder(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                               {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                "chat_template": CHATML})
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]
        tok, raw = _bpe_folder(folder, specials, {"bos_token": "<|begin_of_text|>",
                                                  "eos_token": "<|eot_id|>",
                                                  "chat_template": LLAMA3},
                               _llama3_post_processor)
    return request.param, tok, raw


def _rendered(tok, messages, add_generation_prompt=False):
    return render_chat_template(tok.chat_template, [{"role": r, "content": c} for r, c in messages],
                                add_generation_prompt=add_generation_prompt,
                                bos_token=tok.bos_token, eos_token=tok.eos_token)


def _runs(ids, mask):
    """The ids of each maximal run of masked tokens."""
    runs, current = [], []
    for token, masked in zip(ids.tolist(), mask.tolist()):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("turns", [TURNS, TURNS[1:]], ids=["system", "default-system"])
def test_templated_chat_is_one_tokenization_with_assistant_turns_masked(templated, turns):
    name, tok, raw = templated
    ids, mask = encode_sft(ChatRecord(turns), tok, max_len=1000)
    text = _rendered(tok, turns)
    # One tokenization of the whole render, nothing prepended: Llama 3's template writes BOS
    # itself (so it is there once, not twice) and SmolLM2's tokenizer adds none.
    assert ids.tolist() == raw.encode(text, add_special_tokens=False).ids
    assert tok.add_bos == (name == "llama3")
    if name == "llama3":
        assert ids[0] == tok.bos_id and (ids == tok.bos_id).sum() == 1
    # The loss covers exactly each assistant reply (as the template writes it: Llama 3 trims) and
    # the end of its turn, nothing else.
    replies = [c.strip() if name == "llama3" else c for r, c in turns if r == "assistant"]
    decoded = [raw.decode(run, skip_special_tokens=False) for run in _runs(ids, mask)]
    assert decoded == [reply + ENDS[name] for reply in replies]


def test_chat_prompt_for_generation_is_the_training_prefix(templated):
    name, tok, raw = templated
    ids, mask = encode_sft(ChatRecord(TURNS), tok, max_len=1000)
    for i, (role, _) in enumerate(TURNS):
        if role != "assistant":
            continue
        prompt = encode_chat_prompt(TURNS[:i], tok)
        assert prompt.dtype == np.int32
        assert prompt.tolist() == raw.encode(_rendered(tok, TURNS[:i], True),
                                             add_special_tokens=False).ids
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        assert mask[len(prompt)] and not mask[len(prompt) - 1]
    # Cutting to max_len removes the prompt's first tokens after the BOS; the replies stay whole.
    head = int(ids[0] == tok.bos_id and tok.add_bos)
    for cut in (1, 3):
        short_ids, short_mask = encode_sft(ChatRecord(TURNS), tok, max_len=len(ids) - cut)
        np.testing.assert_array_equal(short_ids, np.concatenate([ids[:head], ids[head + cut:]]))
        np.testing.assert_array_equal(short_mask, np.concatenate([mask[:head], mask[head + cut:]]))


def test_template_that_rewrites_earlier_turns_is_rejected(templated):
    _, tok, raw = templated
    template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                "{{ m.role }}: {{ m.content }}\n{% endfor %}")
    rewriting = HFTokenizer(raw, eos_id=tok.eos_id, source="models/odd", chat_template=template)
    with pytest.raises(ValueError, match=r"^chat template of models/odd: not prefix-consistent"):
        encode_sft(ChatRecord(TURNS), rewriting, max_len=100)
    failing = HFTokenizer(raw, eos_id=tok.eos_id, source="models/strict",
                          chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match=r"^chat template of models/strict: roles must alternate"):
        encode_chat_prompt(TURNS[:2], failing)


def test_bos_follows_add_bos(templated):
    name, tok, raw = templated
    ids, mask = encode_sft(SFTRecord("hello", " there"), tok, max_len=100)
    body = raw.encode("hello there", add_special_tokens=False).ids + [tok.eos_id]
    assert ids.tolist() == ([tok.bos_id] if name == "llama3" else []) + body
    assert encode_prompt("hello", tok).tolist() == ids[: len(ids) - 2].tolist()
    # Even without BOS, generation needs one token to condition on.
    assert encode_prompt("", tok).tolist() == [tok.bos_id]


def _hand_built_bpe():
    """A BPE without a splitting regex whose first merge is ":" + " ", so it crosses words."""
    alphabet = "AnswerĠy:"
    merges = [(":", "Ġ"), ("Ġ", "y"), ("e", "s"), ("Ġy", "es"), ("y", "es"), ("A", "n"),
              ("An", "s"), ("Ans", "w"), ("Answ", "e"), ("Answe", "r")]
    vocab = {"</s>": 0}
    for token in list(alphabet) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    raw = tokenizers.Tokenizer(models.BPE(vocab, merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    return raw


def test_prompt_and_completion_are_tokenized_together():
    raw = _hand_built_bpe()
    tok = HFTokenizer(raw, eos_id=0, add_bos=False)
    pieces = lambda ids: [raw.id_to_token(i) for i in ids]  # noqa: E731
    # Tokenized apart, "Answer:" and " yes" would be Answer | : | Ġyes; joined, ":" and the space
    # merge first. The ids are those of the joined text, and the loss starts at the first token
    # holding completion text.
    assert pieces(tok.encode("Answer:") + tok.encode(" yes")) == ["Answer", ":", "Ġyes"]
    ids, mask = encode_sft(SFTRecord("Answer:", " yes"), tok, max_len=10)
    assert pieces(ids[:-1]) == ["Answer", ":Ġ", "yes"] and ids[-1] == 0
    assert mask.tolist() == [False, True, True, True]


def test_completion_token_that_starts_in_the_prompt_is_learned(templated):
    _, tok, raw = templated
    # "Answer: " + "yes" runs together as Answer | : | Ġyes: the answer's token holds the prompt's
    # trailing space, and it is in the loss (else only the EOS would be).
    ids, mask = encode_sft(SFTRecord("Answer: ", "yes"), tok, max_len=100)
    start = 1 if tok.add_bos else 0
    assert [raw.id_to_token(i) for i in ids[start:-1]] == ["Answer", ":", "Ġyes"]
    assert mask[start:].tolist() == [False, False, True, True]
    assert raw.decode(ids[mask].tolist(), skip_special_tokens=False).startswith(" yes")


def test_tokenizer_without_template_keeps_the_plain_layout():
    raw = _hand_built_bpe()
    tok = HFTokenizer(raw, eos_id=0, add_bos=False)
    chat = ChatRecord((("user", "An"), ("assistant", "yes")))
    ids, mask = encode_sft(chat, tok, max_len=100)
    expected = (tok.encode("<|user|>\n") + tok.encode("An") + [0] + tok.encode("<|assistant|>\n")
                + tok.encode("yes") + [0])
    assert ids.tolist() == expected
    assert ids[mask].tolist() == tok.encode("yes") + [0]
    np.testing.assert_array_equal(encode_chat_prompt(chat.messages[:1], tok),
                                  expected[: -len(tok.encode("yes")) - 1])
