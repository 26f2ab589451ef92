"""The RAG demo: made-up people whose facts exist only in a generated corpus.

Needs no files or network. Run:

    python launch.py --config=configs/rag.py --workdir=runs/rag

Trains the `demo` model from scratch on copy drills, then on texts about made-up people
(drills kept in the mix), fine-tunes it on plain questions, builds BM25 and dense retrievers
(mean-pooled states, and a contrastive head on them) over every person's passage, and answers
questions about held-out people without retrieval, with retrieval, and after
retrieval-augmented fine-tuning (about 7.5 minutes on 2 cores). WORKDIR/summary.json holds
`recall_at_5` (of `rag.retriever`; every retriever's under `recall`), `accuracy_no_retrieval`,
`accuracy_with_retrieval` and `accuracy_rag_finetuned`.

The same questions for a real pretrained chat model afterwards (zero-shot and after a LoRA
retrieval-augmented fine-tuning; `summary.json` key `real_model`, about 9 minutes more):

    python -m ptjax.interop.fetch smollm2
    python launch.py --config=configs/rag.py --workdir=runs/rag \
        --config.rag.real.model=$HOME/.cache/ptjax/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import ml_collections

from ptjax.train.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.trainer = "rag"
    c.model.preset = "demo"
    c.model.dtype = "bfloat16"
    c.train.seq_len = 256
    c.train.batch_size = 16
    c.train.log_every = 25
    c.checkpoint.every = 200

    c.rag = ml_collections.ConfigDict()
    c.rag.train_people = 3000
    c.rag.eval_people = 1000  # held out: their passages are only in the retrieval corpus
    c.rag.eval_questions = 400
    c.rag.pretrain_texts = 40000
    c.rag.rag_sft_examples = 6000
    # One passage per prompt: with the copy drills the demo model learns to copy a value out
    # of one passage (1.00 after 600 steps, offline), not yet to pick the passage about the
    # person asked about among three (0.06 after 600 steps; 0.00 with facts restated by name).
    c.rag.k = 1  # passages per prompt
    # > 0: a byte-level BPE of this size learned from the demo's texts instead of
    # `data.tokenizer` (bytes): towns, jobs and colours one token each, names 2-4, sequences
    # and steps 3.3x cheaper than bytes.
    c.rag.tokenizer_vocab = 1024
    # Copy drills (`synthetic.copy_drills`): the warm-up stage on drills alone, then this
    # fraction of drills (per example) mixed into the base and RAG fine-tuning data.
    c.rag.copy_drill_fraction = 0.3
    c.rag.retriever = "bm25"  # the passages the model reads: bm25, dense (contrastive head) or
    # dense_mean_pooled; every retriever's recall is reported
    # fine-tuning prompts list the gold passage and the distractors in random order (False:
    # in the retriever's order, as at inference)
    c.rag.shuffle_passages = True
    # Prompt for the demo model: numbered passages, then the question (no instruction text: the
    # demo model learns the format, and every token costs attention). The recipe writes the
    # answer after `A:` with its own space, so a BPE word of the answer is the passage's.
    c.rag.template = "{passages}\nQ: {question}\nA:"
    # The dual-encoder head on the base model's mean-pooled states (InfoNCE, in-batch negatives).
    # On the byte-level base, on its final states, a linear head reached recall@5 0.44 (400
    # steps) to 0.89 (6,000 steps), one GELU hidden layer of 768 0.97 in 3,000. The BPE base's
    # final states do not keep the name (0.19-0.26); its mean input embeddings do (1.00, offline).
    c.rag.encoder_states = "embeddings"  # or "final" (hidden states)
    c.rag.head_pairs = 12000  # (question, passage) pairs of training people it learns from
    c.rag.head_dim = 256
    c.rag.head_mlp = 512  # hidden width (0: a linear projection)
    c.rag.head_steps = 2500
    c.rag.head_batch = 256
    c.rag.head_lr = 1e-3
    c.rag.temperature = 0.05
    # Optional, after the demo: the same questions for a real pretrained chat model (a GGUF file
    # or Hugging Face folder, e.g. SmolLM2-135M-Instruct from `python -m ptjax.interop.fetch
    # smollm2`), zero-shot and after a LoRA retrieval-augmented fine-tuning, BM25 passages.
    c.rag.real = ml_collections.ConfigDict({
        "model": "",
        "eval_questions": 200,
        "k": 3,  # BM25 passages per prompt (a pretrained model picks the right one itself)
        "max_new_tokens": 16,
        "finetune_examples": 1264,  # 1,200 to train on, 64 held out for the eval loss
        "finetune": {
            # 3 passages (~35 tokens each), the instruction, the question and the chat
            # template: ~200 tokens
            # SmolLM2-135M-Instruct: 0.98 exact match after 50 steps (8.6 min for the stage),
            # 1.00 after 100 (14.3 min)
            "train": {"steps": 50, "batch_size": 8, "seq_len": 256},
            "optim": {"lr": 2e-4, "warmup_steps": 10},
            "eval": {"every": 50},
        },
    })
    c.rag.copy_warmup = ml_collections.ConfigDict({
        "train": {"steps": 400, "seq_len": 128},  # drills of 2 x 20 tokens, 3 to a row
        "optim": {"lr": 3e-3, "warmup_steps": 50},
        "eval": {"every": 400},
    })
    c.rag.pretrain = ml_collections.ConfigDict({
        "train": {"steps": 500, "seq_len": 128},  # two passages and three recaps: ~100 tokens
        "optim": {"lr": 3e-3, "warmup_steps": 50},
        "eval": {"every": 500},
    })
    c.rag.sft = ml_collections.ConfigDict({
        "train": {"steps": 100, "seq_len": 64},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "eval": {"every": 100},
    })
    c.rag.rag_sft = ml_collections.ConfigDict({
        # one passage (~35 tokens) and the question: ~55 tokens per example. 600 steps
        # reached 0.47 exact match, the same run resumed to 1,000 steps 0.66 (2026-12-07)
        "train": {"steps": 1000, "seq_len": 192},
        "optim": {"lr": 3e-3, "warmup_steps": 50},
        "eval": {"every": 1000},
    })
    return c
