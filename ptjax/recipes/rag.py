"""The RAG demo: questions about made-up people, answerable only from a generated corpus.

Stages (each with its own workdir under WORKDIR; rerunning resumes the training stages):
0. `copy_warmup`: the small model, from scratch, on repeated random token strings only
   (`synthetic.copy_drills`), where an induction (copy) circuit forms within a few hundred
   steps; the drills stay in the mix of the base and RAG fine-tuning data so it stays.
1. `base`: pretrained on texts about people made up for each text (never the training or
   held-out people), each ending with restated facts, so it learns the language and to copy a
   fact from earlier in the text rather than to memorize people.
2. `sft`: fine-tuned on plain `Q:`/`A:` questions about the training people, no passages.
3. retrieval over the passages of all people (training and held out): BM25, the base model's
   mean-pooled states (final, or its input embeddings: `rag.encoder_states`), and those states
   through a contrastive dual-encoder head trained on the
   training people's (question, passage) pairs; recall@1/3/5/10 on the held-out questions.
4. accuracy on held-out questions with the `sft` model, without and with the retrieved passages.
5. `rag_sft`: retrieval-augmented fine-tuning from `sft` through the ordinary SFT trainer, on
   prompts carrying k retrieved passages (gold included, distractors shuffled) with the cited
   answer as the completion; then accuracy with retrieval again.
6. optional (`rag.real.model`): the held-out questions for a real pretrained chat model,
   zero-shot without and with BM25 passages and after a LoRA retrieval-augmented fine-tuning
   (`real_model_stage`).
Writes WORKDIR/summary.json (`recall_at_5`, `accuracy_no_retrieval`, `accuracy_with_retrieval`,
`accuracy_rag_finetuned`, per-retriever recall, stage seconds, `real_model`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ptjax import data as D
from ptjax import sampling
from ptjax.rag import encoder, pipeline, synthetic
from ptjax.rag.finetune import rag_sft_records
from ptjax.rag.prompt import build_prompt, encode_rag_prompt, parse_answer
from ptjax.recipes.demo import stage_config
from ptjax.train import trainer

RECALL_KS = (1, 3, 5, 10)


def encode(records, tokenizer, seq_len):
    return [D.encode_sft(r, tokenizer, seq_len) for r in records]


def exact_match(answers: list[str], predictions: list[str]) -> float:
    """Exact-match accuracy after stripping (the demo's `score`)."""
    return D.score(answers, predictions)


def evaluate(params, model_cfg, tokenizer, retriever, eval_qs, k: int, template: str) -> dict:
    """Accuracy of greedy answers to the held-out questions with k retrieved passages (k = 0:
    the bare question), plus how often the cited passage is the gold one."""
    questions = [q for q, _, _ in eval_qs]
    answers = [a for _, a, _ in eval_qs]
    if k == 0:
        prompts = [build_prompt(q, [], template) for q in questions]
        preds = sampling.generate_text(params, model_cfg, tokenizer, prompts, max_new_tokens=16)
        return {"accuracy": exact_match(answers, [parse_answer(p, [])[0] for p in preds])}
    results = pipeline.answer_questions(params, model_cfg, tokenizer, retriever, questions, k,
                                        template=template, max_new_tokens=16)
    cited_gold = [bool(r["citations"]) and r["citations"][0] in gold
                  for r, (_, _, gold) in zip(results, eval_qs)]
    return {"accuracy": exact_match(answers, [r["answer"] for r in results]),
            "citation_accuracy": float(np.mean(cited_gold)),
            "example": results[0]}


def retrieval_stage(config, base, tokenizer, people, train_qs, eval_qs) -> tuple[dict, dict]:
    """(retrievers by name, recall@k of each on the held-out questions)."""
    r = config.rag
    passages = [p.passage() for p in people]
    by_id = {p.id: i for i, p in enumerate(passages)}
    retrievers = {"bm25": pipeline.BM25Retriever(passages)}
    states = r.encoder_states
    pooled_passages = encoder.embed_texts(base.params, base.model_cfg, tokenizer,
                                          [p.text for p in passages], states=states)
    retrievers["dense_mean_pooled"] = pipeline.DenseRetriever(
        pipeline.index_of_pooled(pooled_passages, passages, base.params, base.model_cfg,
                                 states=states),
        base.params, base.model_cfg, tokenizer, states=states)
    head_qs = train_qs[:r.head_pairs]
    pooled_questions = encoder.embed_texts(base.params, base.model_cfg, tokenizer,
                                           [q for q, _, _ in head_qs], states=states)
    gold_rows = [by_id[gold[0]] for _, _, gold in head_qs]
    head, losses = encoder.train_head(pooled_questions, pooled_passages[gold_rows],
                                      dim=r.head_dim, mlp=r.head_mlp, steps=r.head_steps,
                                      batch_size=r.head_batch, lr=r.head_lr,
                                      temperature=r.temperature, seed=config.seed)
    index = pipeline.index_of_pooled(pooled_passages, passages, base.params, base.model_cfg,
                                     head, states=states)
    retrievers["dense"] = pipeline.DenseRetriever(index, base.params, base.model_cfg, tokenizer,
                                                  head, states=states)
    recall = {}
    questions = [q for q, _, _ in eval_qs]
    golds = [g for _, _, g in eval_qs]
    for name, retriever in retrievers.items():
        _, rows = retriever.search(questions, max(RECALL_KS))
        recall[name] = {f"recall_at_{k}": pipeline.recall_at_k(rows, passages, golds, k)
                        for k in RECALL_KS}
    recall["dense"]["head_loss_first_last"] = [losses[0], losses[-1]]
    return retrievers, recall


def real_model_stage(config, workdir: str, people, train_qs, eval_qs) -> dict:
    """The same held-out questions for a real pretrained chat model (`rag.real.model`, a GGUF
    file or Hugging Face folder): without passages, with BM25's k passages in its own chat
    template, and after a retrieval-augmented LoRA fine-tuning on the training people's
    questions (`rag.real.finetune`). Exact match after the citation is stripped, and how often
    the reply contains the answer as a word (a zero-shot model answers in sentences)."""
    import jax

    from ptjax.interop import load

    r, real = config.rag, config.rag.real
    pretrained = load.load(real.model, dtype=config.model.dtype)
    params = jax.tree.map(jax.numpy.asarray, pretrained.params)
    cfg, tok = pretrained.config, pretrained.tokenizer
    passages = [p.passage() for p in people]
    retriever = pipeline.BM25Retriever(passages)
    qs = eval_qs[:real.eval_questions]
    answers = [a for _, a, _ in qs]

    def scores(replies: list[str]) -> dict:
        stripped = [parse_answer(x, [])[0] for x in replies]
        words = [x.lower().replace(".", " ").replace(",", " ").split() for x in replies]
        return {"accuracy": exact_match(answers, stripped),
                "answer_in_reply": float(np.mean([a.lower() in w
                                                  for a, w in zip(answers, words)])),
                "example": replies[0]}

    def with_passages(p):
        results = pipeline.answer_questions(p, cfg, tok, retriever, [q for q, _, _ in qs], real.k,
                                            max_new_tokens=real.max_new_tokens)
        return scores([x["reply"] for x in results])

    bare = [encode_rag_prompt(q, [], tok) for q, _, _ in qs]
    out = {"model": real.model, "retriever": "bm25", "eval_questions": len(qs),
           "no_retrieval": scores(sampling.generate_from_ids(
               params, cfg, tok, bare, max_new_tokens=real.max_new_tokens)),
           "with_retrieval": with_passages(params)}
    ft_qs = train_qs[:real.finetune_examples]
    _, rows = retriever.search([q for q, _, _ in ft_qs], real.k)
    records = rag_sft_records([q for q, _, _ in ft_qs], [a for _, a, _ in ft_qs],
                              [g for _, _, g in ft_qs], rows, passages, real.k, seed=config.seed,
                              chat=True)
    c = stage_config(config, real.finetune, method="lora")
    split = len(records) - 64
    tuned = trainer.train(c, os.path.join(workdir, "real_rag_sft"),
                          encode(records[:split], tok, c.train.seq_len),
                          encode(records[split:], tok, c.train.seq_len), init_params=params,
                          model_cfg=cfg, tokenizer=tok)
    out["rag_finetuned"] = with_passages(tuned.params)
    return out


def demo_tokenizer(config, workdir: str, texts: list[str]):
    """`data.tokenizer` (bytes by default), or with `rag.tokenizer_vocab` > 0 a byte-level BPE of
    that size learned from the demo's own texts and kept in WORKDIR/tokenizer (a rerun reloads
    it, so a resumed stage sees the tokenizer its checkpoint was trained with)."""
    vocab = config.rag.tokenizer_vocab
    if not vocab:
        return D.load_tokenizer(config.data.tokenizer)
    folder = os.path.join(workdir, "tokenizer")
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return D.load_tokenizer(folder)
    return D.train_bpe(texts, vocab, folder)


def run(config, workdir: str) -> dict:
    """Every stage; writes WORKDIR/summary.json and returns it."""
    started = time.time()
    r = config.rag
    people = synthetic.entities(r.train_people + r.eval_people, config.seed)
    train_people, eval_people = people[:r.train_people], people[r.train_people:]
    train_qs = synthetic.questions(train_people, config.seed + 1, per_entity=4)
    eval_qs = synthetic.questions(eval_people, config.seed + 2)[:r.eval_questions]
    cities = synthetic.towns(config.seed)
    texts = synthetic.pretraining_texts(r.pretrain_texts, config.seed + 3, cities)
    held = synthetic.pretraining_texts(200, config.seed + 4, cities)
    tokenizer = demo_tokenizer(config, workdir, texts + [p.passage().text for p in people]
                               + [q for q, _, _ in train_qs])
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    seconds = summary.setdefault("stage_seconds", {})

    def timed(name, t0):
        seconds[name] = round(time.time() - t0, 1)
        trainer.write_summary(summary_path, summary)

    def drills(n, seed):
        return synthetic.copy_drills(n, seed, tokenizer.vocab_size, tokenizer.bos_id,
                                     tokenizer.eos_id)

    def with_drills(examples, seed):
        mixed = examples + drills(int(len(examples) * r.copy_drill_fraction), seed)
        return [mixed[i] for i in np.random.default_rng(seed).permutation(len(mixed))]

    t0 = time.time()
    c = stage_config(config, r.copy_warmup, method="full")
    model_cfg = dataclasses.replace(trainer.model_config(c), vocab_size=tokenizer.vocab_size)
    warmup = trainer.train(c, os.path.join(workdir, "copy_warmup"),
                           drills(20000, config.seed + 5), drills(100, config.seed + 6),
                           model_cfg=model_cfg, tokenizer=tokenizer)
    timed("copy_warmup", t0)

    t0 = time.time()
    c = stage_config(config, r.pretrain, method="full")
    base = trainer.train(c, os.path.join(workdir, "base"),
                         with_drills(encode([D.SFTRecord("", t) for t in texts], tokenizer,
                                            c.train.seq_len), config.seed + 7),
                         encode([D.SFTRecord("", t) for t in held], tokenizer, c.train.seq_len),
                         init_params=warmup.params, model_cfg=model_cfg, tokenizer=tokenizer)
    timed("base", t0)

    t0 = time.time()
    # The answer follows the template's `A:` with its own leading space, so a word-level token
    # of the answer is the same token as in the passages (byte-level BPE words carry their space).
    plain = [{"prompt": build_prompt(q, [], r.template), "completion": " " + a}
             for q, a, _ in train_qs]
    split = len(plain) - 200
    c = stage_config(config, r.sft, method="full")
    sft = trainer.train(c, os.path.join(workdir, "sft"),
                        encode(plain[:split], tokenizer, c.train.seq_len),
                        encode(plain[split:], tokenizer, c.train.seq_len), init_params=base.params,
                        model_cfg=base.model_cfg, tokenizer=tokenizer)
    timed("sft", t0)

    t0 = time.time()
    retrievers, recall = retrieval_stage(config, base, tokenizer, people, train_qs, eval_qs)
    summary["recall"] = recall
    timed("retrieval", t0)
    retriever = retrievers[r.retriever]
    passages = retriever.passages

    t0 = time.time()
    no_retrieval = evaluate(sft.params, sft.model_cfg, tokenizer, None, eval_qs, 0, r.template)
    with_retrieval = evaluate(sft.params, sft.model_cfg, tokenizer, retriever, eval_qs, r.k,
                              r.template)
    summary.update(accuracy_no_retrieval=no_retrieval["accuracy"],
                   accuracy_with_retrieval=with_retrieval["accuracy"])
    timed("eval_sft", t0)

    t0 = time.time()
    ft_qs = train_qs[:r.rag_sft_examples]
    _, rows = retriever.search([q for q, _, _ in ft_qs], r.k)
    records = rag_sft_records([q for q, _, _ in ft_qs], [" " + a for _, a, _ in ft_qs],
                              [g for _, _, g in ft_qs], rows, passages, r.k, seed=config.seed,
                              template=r.template, shuffle=r.shuffle_passages)
    split = len(records) - 200
    c = stage_config(config, r.rag_sft, method="full")
    rag_sft = trainer.train(c, os.path.join(workdir, "rag_sft"),
                            with_drills(encode(records[:split], tokenizer, c.train.seq_len),
                                        config.seed + 8),
                            encode(records[split:], tokenizer, c.train.seq_len),
                            init_params=sft.params, model_cfg=sft.model_cfg, tokenizer=tokenizer)
    finetuned = evaluate(rag_sft.params, rag_sft.model_cfg, tokenizer, retriever, eval_qs, r.k,
                         r.template)
    timed("rag_sft", t0)

    summary.update({
        "recall_at_5": recall[r.retriever]["recall_at_5"],
        "recall_at_5_bm25": recall["bm25"]["recall_at_5"],
        "recall_at_5_dense": recall["dense"]["recall_at_5"],
        "recall_at_5_dense_mean_pooled": recall["dense_mean_pooled"]["recall_at_5"],
        "accuracy_no_retrieval": no_retrieval["accuracy"],
        "accuracy_with_retrieval": with_retrieval["accuracy"],
        "accuracy_rag_finetuned": finetuned["accuracy"],
        "citation_accuracy_with_retrieval": with_retrieval["citation_accuracy"],
        "citation_accuracy_rag_finetuned": finetuned["citation_accuracy"],
        "retriever": r.retriever, "k": r.k, "eval_questions": len(eval_qs),
        "example": finetuned["example"],
        "seconds": round(time.time() - started, 1),
    })
    if r.real.model:
        t0 = time.time()
        summary["real_model"] = real_model_stage(config, workdir, people, train_qs, eval_qs)
        timed("real_model", t0)
    trainer.write_summary(summary_path, summary)
    print({k: v for k, v in summary.items() if k not in ("example", "recall", "real_model")})
    if r.real.model:
        print("real model:", summary["real_model"])
    return summary
