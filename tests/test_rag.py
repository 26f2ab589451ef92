"""RAG pieces: JSONL readers, the contrastive loss and pooling against float64 numpy, prompts and
citations, fine-tuning records, BM25, and retrieve-then-generate on the tiny model."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import data as D
from ptjax.data import DataError
from ptjax.models import llama
from ptjax.models.config import preset
from ptjax.rag import (BM25Retriever, DenseRetriever, Passage, answer_questions, apply_head,
                       build_dense_index, build_prompt, embed_texts, encode_rag_prompt, info_nce,
                       mean_pool, parse_answer, passages_with_gold, rag_sft_records,
                       read_passages_jsonl,
                       read_questions_jsonl, recall_at_k, synthetic, train_head)
from tiny_checkpoint import write_chat_model


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_passages_and_questions(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", ['{"id": 7, "text": "a", "title": "T"}',
                                           '', '{"id": "x", "text": "b"}'])
    assert read_passages_jsonl(p) == [Passage("7", "a", "T"), Passage("x", "b")]
    q = write_lines(tmp_path / "q.jsonl", ['{"question": "why?", "answer": "so", '
                                           '"gold_ids": [7, "x"]}', '{"question": "how?"}'])
    got = read_questions_jsonl(q)
    assert got[0].gold_ids == ("7", "x") and got[1].answer == "" and got[1].gold_ids == ()


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "text": "a"}', '{"text": "b"}'], ":2: missing field 'id'"),
    (['{"id": 1, "text": 5}'], ":1: field 'text': expected a string, got int"),
    (['{"id": [1], "text": "a"}'], ":1: field 'id': expected a string or integer id, got list"),
    (['{"id": 1, "text": "a"}', '{"id": "1", "text": "b"}'],
     ":2: field 'id': duplicate id '1' (first on line 1)"),
    (['{"id": 1, "text": "a", "title": null}'], ":1: field 'title': expected a string, got null"),
    (['{"id": 1, "text": "a"', ], ":1: invalid JSON"),
])
def test_passage_errors_name_file_line_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_passages_jsonl(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_question_errors_name_file_line_field(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ['{"question": "a"}', '{"question": "b", '
                                              '"gold_ids": [true]}'])
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'gold_ids\[0\]'"):
        read_questions_jsonl(path)
    path = write_lines(tmp_path / "q2.jsonl", ['{"answer": "a"}'])
    with pytest.raises(DataError, match=r"q2.jsonl:1: missing field 'question'"):
        read_questions_jsonl(path)


def info_nce_reference(q, p, temperature):
    """Float64 numpy: -mean_i log(exp(q_i.p_i / t) / sum_j exp(q_i.p_j / t))."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    logits = q @ p.T / temperature
    m = logits.max(1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(log_z - np.diag(logits)))


def test_info_nce_matches_float64_reference():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss_and_grad = jax.jit(jax.value_and_grad(info_nce), static_argnums=2)
    got, g = loss_and_grad(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32), 0.3)
    np.testing.assert_allclose(float(got), info_nce_reference(q, p, 0.3), rtol=1e-5)
    # the gradient too, against central differences of the float64 reference
    eps, i, j = 1e-6, 2, 3
    qp, qm = q.copy(), q.copy()
    qp[i, j] += eps
    qm[i, j] -= eps
    fd = (info_nce_reference(qp, p, 0.3) - info_nce_reference(qm, p, 0.3)) / (2 * eps)
    np.testing.assert_allclose(float(g[i, j]), fd, rtol=1e-3)


def test_mean_pool_and_head_against_numpy():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3, 5, 4))
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    got = np.asarray(jax.jit(mean_pool)(jnp.asarray(h, jnp.float32), jnp.asarray(mask)))
    ref = np.stack([h[i][mask[i]].mean(0) if mask[i].any() else np.zeros(4) for i in range(3)])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    head = {"kernel": rng.normal(size=(4, 2)).astype(np.float32), "bias": np.ones(2, np.float32)}
    out = np.asarray(apply_head(head, got[:2]))
    y = ref[:2] @ head["kernel"].astype(np.float64) + 1.0
    np.testing.assert_allclose(out, y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-5)
    mlp = {**head, "hidden": {"kernel": rng.normal(size=(4, 4)).astype(np.float32),
                              "bias": np.zeros(4, np.float32)}}
    z = ref[:2] @ mlp["hidden"]["kernel"].astype(np.float64)
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # GELU (tanh)
    y = z @ head["kernel"].astype(np.float64) + 1.0
    np.testing.assert_allclose(np.asarray(apply_head(mlp, got[:2])),
                               y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-5)


def test_train_head_separates_pairs():
    # pooled "questions" and "passages" share a latent topic under different noise and offsets
    rng = np.random.default_rng(2)
    topic = rng.normal(size=(512, 8))
    mix_q, mix_p = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    q = topic @ mix_q + 3.0 + 0.1 * rng.normal(size=(512, 16))
    p = topic @ mix_p - 2.0 + 0.1 * rng.normal(size=(512, 16))
    head, losses = train_head(q, p, dim=8, steps=150, batch_size=128, lr=1e-2, temperature=0.1)
    assert losses[-1] < 0.3 * losses[0]

    def top1(head):
        sims = np.asarray(apply_head(head, q)) @ np.asarray(apply_head(head, p)).T
        return np.mean(sims.argmax(1) == np.arange(512))

    assert top1(None) < 0.2 and top1(head) > 0.8  # measured 0.88 (raw cosine 0.01)


def test_prompt_numbering_and_citations():
    passages = [Passage("a", "Alpha text", "Alpha"), Passage("b", "Beta text")]
    prompt = build_prompt("What?", passages, "{passages}\nQ: {question}\nA: ")
    assert prompt == "[1] Alpha: Alpha text\n[2] Beta text\nQ: What?\nA: "
    assert "cite the passage" in build_prompt("What?", passages)
    assert parse_answer("Trosk [2]", passages) == ("Trosk", ["b"])
    assert parse_answer("x [1] y [2][1] [9]", passages) == ("x y", ["a", "b"])
    assert parse_answer("no citation", passages) == ("no citation", [])
    assert parse_answer("a [0] [3]", passages) == ("a", [])  # numbers that name no passage


def test_rag_sft_records_put_the_gold_passage_in():
    passages = [Passage(str(i), f"text {i}") for i in range(6)]
    rng = np.random.default_rng(0)
    # gold retrieved: the same three passages, shuffled; gold missed: it replaces the last
    chosen, number = passages_with_gold([4, 1, 2], passages, ("1",), 3, rng)
    assert sorted(p.id for p in chosen) == ["1", "2", "4"] and chosen[number - 1].id == "1"
    chosen, number = passages_with_gold([4, 3, 2], passages, ("5",), 3, rng)
    assert sorted(p.id for p in chosen) == ["3", "4", "5"] and chosen[number - 1].id == "5"
    records = rag_sft_records(["Q1?"] * 40, ["ans"] * 40, [("0",)] * 40,
                              np.tile([3, 0, 5], (40, 1)), passages, 3, template="{passages}|"
                              "{question}|")
    numbers = [int(r["completion"].split("[")[1][0]) for r in records]
    assert set(numbers) == {1, 2, 3}  # the gold's position is shuffled, not learnable
    for r, n in zip(records, numbers):
        assert r["completion"] == f"ans [{n}]" and re.search(rf"\[{n}\] text 0\b", r["prompt"])


def test_chat_rag_records_train_on_the_prompt_the_model_is_asked_with(tmp_path):
    """A chat model fine-tuned on `rag_sft_records(chat=True)` sees, in front of its answer,
    token for token the prompt `encode_rag_prompt` gives it at inference, and the loss is on
    the cited answer (and the turn's end) only."""
    write_chat_model(tmp_path / "chat")
    tok = D.load_tokenizer(str(tmp_path / "chat"))
    passages = [Passage(str(i), f"Person {i} lives in Town{i}.") for i in range(4)]
    (record,) = rag_sft_records(["Where does Person 2 live?"], ["Town2"], [("2",)],
                                np.array([[1, 2, 3]]), passages, 3, seed=1, chat=True)
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant"]
    reply = record["messages"][2]["content"]
    number = int(reply.split("[")[1][0])
    assert reply == f"Town2 [{number}]"
    shown = [p for p in passages if f"] {p.text}" in record["messages"][1]["content"]]
    ids, mask = D.encode_sft(record, tok, 512)
    numbered = re.findall(r"\[(\d)\] Person (\d)", record["messages"][1]["content"])
    order = [passages[int(i)] for _, i in numbered]
    assert len(shown) == 3 and order[number - 1].id == "2"
    prompt = encode_rag_prompt("Where does Person 2 live?", order, tok)
    np.testing.assert_array_equal(ids[:len(prompt)], prompt)
    assert not mask[:len(prompt)].any() and mask[len(prompt):].all()
    assert tok.decode(ids[len(prompt):]).startswith(reply)


def test_bm25_finds_rare_names_and_recall():
    people = synthetic.entities(50, 0)
    passages = [p.passage() for p in people]
    qs = synthetic.questions(people, 1)
    _, rows = BM25Retriever(passages).search([q for q, _, _ in qs], 3)
    assert recall_at_k(rows, passages, [g for _, _, g in qs], 1) > 0.9
    assert recall_at_k(np.array([[1, 0]]), passages, [("p00000",)], 1) == 0.0
    assert recall_at_k(np.array([[1, 0]]), passages, [("p00000",)], 2) == 1.0


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny")
    return cfg, llama.init_params(cfg, jax.random.key(0)), D.ByteTokenizer()


def test_embed_texts_matches_one_at_a_time(tiny):
    cfg, params, tok = tiny
    texts = ["short", "a longer text", "x" * 14]  # one length bucket: one compile
    batched = embed_texts(params, cfg, tok, texts, batch_size=4)
    chex.assert_shape(batched, (3, cfg.hidden))
    for i, t in enumerate(texts):  # padding and batch-mates must not change a row
        np.testing.assert_allclose(embed_texts(params, cfg, tok, [t], batch_size=4)[0],
                                   batched[i], atol=1e-5)
    # against a plain masked mean of the model's hidden states, row by row, unpadded
    ids = D.encode_prompt(texts[1], tok)[None]
    h = llama.hidden_states(params, cfg, llama.embed_tokens(params, cfg, ids),
                            np.arange(ids.shape[1])[None], np.ones_like(ids))
    np.testing.assert_allclose(batched[1], np.asarray(h[0]).mean(0), atol=1e-5)


def test_answer_questions_returns_passages_and_citations(tiny, tmp_path):
    cfg, params, tok = tiny
    passages = [Passage(f"p{i}", f"fact number {i}") for i in range(8)]
    index = build_dense_index(params, cfg, tok, passages)
    assert index.encoder["fingerprint"]
    retriever = DenseRetriever(index, params, cfg, tok)
    out = answer_questions(params, cfg, tok, retriever, ["which fact?", "another"], k=2,
                           max_new_tokens=4, batch_size=2)
    assert len(out) == 2
    for r in out:
        assert set(r) == {"answer", "reply", "passages", "citations"}
        assert len(r["passages"]) == 2 and all(p["id"].startswith("p") for p in r["passages"])
        assert r["passages"][0]["score"] >= r["passages"][1]["score"]
        assert set(r["citations"]) <= {p["id"] for p in r["passages"]}
    index.save(tmp_path / "ix")
    assert json.loads((tmp_path / "ix" / "index.json").read_text())["count"] == 8


def test_embed_texts_from_input_embeddings_is_the_mean_of_the_tokens_rows(tiny):
    from ptjax.rag import encoder

    cfg, params, tok = tiny
    texts = ["short", "a longer text"]
    got = embed_texts(params, cfg, tok, texts, batch_size=4, states="embeddings")
    chex.assert_shape(got, (2, cfg.hidden))
    table = np.asarray(params["embed"]["embedding"], np.float64)
    for row, text in zip(got, texts):  # float64 rows of the table, averaged in numpy
        np.testing.assert_allclose(row, table[D.encode_prompt(text, tok)].mean(0), atol=1e-6)
    assert not np.allclose(got, embed_texts(params, cfg, tok, texts, batch_size=4), atol=1e-3)
    with pytest.raises(ValueError, match="rag.encoder_states"):
        embed_texts(params, cfg, tok, texts, states="middle")
    # the retriever embeds its queries as the index was built: each passage finds itself
    passages = [Passage(f"p{i}", f"fact {i} about {'xyz'[i % 3] * (i + 1)}") for i in range(12)]
    index = build_dense_index(params, cfg, tok, passages, states="embeddings")
    _, rows = DenseRetriever(index, params, cfg, tok, states="embeddings").search(
        [p.text for p in passages], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(12))
    # an index of one kind of states never answers queries embedded the other way
    assert encoder.fingerprint(params, cfg) == encoder.fingerprint(params, cfg, None, "final")
    assert encoder.fingerprint(params, cfg) != encoder.fingerprint(params, cfg, None,
                                                                   "embeddings")


def test_copy_drills_repeat_a_random_string_with_the_loss_on_the_repeat():
    from ptjax.rag import synthetic

    drills = synthetic.copy_drills(50, 0, vocab_size=40, bos=1, eos=2, length=6)
    for ids, mask in drills:
        chex.assert_shape([ids, mask], (14,))
        assert ids[0] == 1 and ids[-1] == 2 and ids.min() >= 1
        np.testing.assert_array_equal(ids[1:7], ids[7:13])
        assert ((ids[1:13] >= 3) & (ids[1:13] < 40)).all()
        # the loss covers the repeat from its second token (copyable) and EOS, nothing before
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(8, 14))
    assert len({tuple(ids) for ids, _ in drills}) == 50
    again = synthetic.copy_drills(50, 0, vocab_size=40, bos=1, eos=2, length=6)
    assert all((a == b).all() for (a, _), (b, _) in zip(drills, again))
