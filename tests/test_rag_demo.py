"""The RAG demo end to end at toy size: every stage runs and summary.json has its keys."""

import json

import pytest

from configs.rag import get_config


@pytest.mark.slow  # the RAG demo's wiring at toy size; the demo itself is in the README
@pytest.mark.parametrize("tokenizer_vocab", [0, 400])  # bytes, and a BPE learned by the demo
def test_rag_demo_runs_every_stage(tmp_path, tokenizer_vocab):
    from ptjax.recipes import rag

    c = get_config()
    c.rag.tokenizer_vocab = tokenizer_vocab
    c.model.preset = "tiny"
    c.train.update(seq_len=128, batch_size=8)
    r = c.rag
    r.update(train_people=300, eval_people=50, eval_questions=8, pretrain_texts=100,
             rag_sft_examples=260, head_pairs=200, head_steps=5, head_batch=32, head_mlp=16)
    for stage in (r.copy_warmup, r.pretrain, r.sft, r.rag_sft):
        stage.train.steps = 2
        stage.eval.every = 2
    r.pretrain.train.seq_len = 320
    r.rag_sft.train.seq_len = 384
    summary = rag.run(c, str(tmp_path))
    for key in ("recall_at_5", "accuracy_no_retrieval", "accuracy_with_retrieval",
                "accuracy_rag_finetuned", "recall_at_5_bm25", "recall_at_5_dense"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["recall_at_5_bm25"] > 0.9  # made-up names are rare words
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy_rag_finetuned"] == summary["accuracy_rag_finetuned"]
    assert set(on_disk["example"]) == {"answer", "reply", "passages", "citations"}
    if tokenizer_vocab:  # the learned tokenizer is kept for a rerun, which resumes with it
        assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
        assert rag.run(c, str(tmp_path))["accuracy_rag_finetuned"] == summary[
            "accuracy_rag_finetuned"]


@pytest.mark.slow  # loads, evaluates and LoRA-fine-tunes a tiny chat checkpoint
def test_real_model_stage_evaluates_and_fine_tunes_a_chat_checkpoint(tmp_path):
    from ptjax.rag import synthetic
    from ptjax.recipes import rag
    from tiny_checkpoint import write_chat_model

    write_chat_model(tmp_path / "chat")
    c = get_config()
    c.model.dtype = "float32"
    real = c.rag.real
    real.update(model=str(tmp_path / "chat"), eval_questions=4, max_new_tokens=4,
                finetune_examples=70)
    real.finetune.train.update(steps=2, batch_size=8, seq_len=512)
    real.finetune.eval.every = 2
    people = synthetic.entities(40, 0)
    train_qs = synthetic.questions(people[:30], 1, per_entity=4)
    eval_qs = synthetic.questions(people[30:], 2)
    out = rag.real_model_stage(c, str(tmp_path / "run"), people, train_qs, eval_qs)
    assert out["eval_questions"] == 4 and out["retriever"] == "bm25"
    for stage in ("no_retrieval", "with_retrieval", "rag_finetuned"):
        assert 0.0 <= out[stage]["accuracy"] <= out[stage]["answer_in_reply"] <= 1.0
        assert isinstance(out[stage]["example"], str)
    assert (tmp_path / "run" / "real_rag_sft" / "checkpoints").is_dir()
