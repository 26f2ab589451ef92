"""Inference-time guidance on the demo task (and optionally a real model): soft prompts
optimized against an objective, classifier-free guidance, constrained decoding.

The demo part pretrains (or reuses) the demo's base model, which has seen the task facts only in
raw form ("13+9=22") and never the instruction format ("Q: 13+9\nA: "). Then, with its weights
frozen throughout:

- a soft prompt is optimized for the log-likelihood of correct answers to instruction prompts,
  continuous and as a discrete token string (Gumbel-softmax straight-through), and the
  continuous one is also projected onto its nearest tokens; each is scored by the objective on
  the training questions and by exact-match accuracy on held-out ones;
- classifier-free guidance at several scales on raw-form addition prompts against the empty
  prompt, and with a negative prompt;
- completions constrained to a regular expression (raw-form sums) and to a JSON schema
  (instruction prompts), against the same model unconstrained.

With `model.init` naming a checkpoint (a GGUF file or Hugging Face folder, e.g. SmolLM2-135M-
Instruct), the same three run on it with chat prompts from `guide.real`. Writes
WORKDIR/summary.json.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import numpy as np

from ptjax import data as D
from ptjax import sampling
from ptjax.guidance import cfg as guided
from ptjax.guidance import constraints, soft_prompt
from ptjax.recipes import demo
from ptjax.train import trainer


def _answer(text: str) -> str:
    """The number a raw-form completion starts with ("22\\nnote..." -> "22")."""
    return re.match(r"\s*(\d*)", text).group(1)


def prompt_results(name, params, cfg, tokenizer, prompt_params, objective, batch, eval_items,
                   g, n_examples: int) -> dict:
    """Objective on the training questions and held-out accuracy for one prompt."""
    texts = [prompt for _, prompt, _ in eval_items]
    preds = soft_prompt.generate_text(params, cfg, tokenizer, prompt_params, texts,
                                      max_new_tokens=g.max_new_tokens)
    answers = [answer for _, _, answer in eval_items]
    row = {"objective": soft_prompt.evaluate(objective, params, prompt_params, batch),
           "accuracy": D.score(answers, preds),
           "examples": [{"prompt": t, "completion": p} for t, p in
                        zip(texts[:n_examples], preds[:n_examples])]}
    print(f"  {name:<22} objective {row['objective']:8.4f}  accuracy {row['accuracy']:.3f}")
    return row


def soft_prompts(params, cfg, tokenizer, g, seed: int) -> dict:
    """Continuous and discrete soft prompts for the instruction format's answers."""
    records = D.instruction_records(g.train_questions, seed + 10, tasks=list(g.tasks))
    batch = soft_prompt.target_batch(tokenizer, [r["prompt"] for r in records],
                                     [r["completion"] for r in records])
    eval_items = D.eval_set(g.eval_questions, seed + 11, tasks=list(g.tasks))
    objective = soft_prompt.target_log_likelihood(cfg)
    allowed = np.arange(cfg.vocab_size) >= D.ByteTokenizer.OFFSET if isinstance(
        tokenizer, D.ByteTokenizer) else None
    n = g.prompt_tokens
    key = jax.random.key(seed)
    out = {"objective": "mean log p(answer token | prompt, question), training questions",
           "prompt_tokens": n, "steps": g.steps}
    show = g.examples

    def report(name, prompt_params):
        out[name] = prompt_results(name, params, cfg, tokenizer, prompt_params, objective,
                                   batch, eval_items, g, show)
        return out[name]

    report("no_prompt", {})
    start = soft_prompt.init_prompt(params, cfg, key, n=n)
    report("continuous_start", start)
    started = time.time()
    tuned, history = soft_prompt.optimize(objective, params, start, batch, steps=g.steps,
                                          learning_rate=g.lr, key=key)
    out["continuous_seconds"] = round(time.time() - started, 1)
    out["continuous_history"] = [round(float(v), 4) for v in history[:: max(g.steps // 10, 1)]]
    report("continuous", tuned)
    near = soft_prompt.nearest_tokens(params, tuned["prompt"]["embeddings"], allowed=allowed)
    report("nearest_tokens", soft_prompt.token_prompt(params, near))["text"] = \
        tokenizer.decode(near)

    relaxed = soft_prompt.relax_discrete(objective, steps=g.discrete_steps, allowed=allowed)
    logits = soft_prompt.init_discrete(cfg, jax.random.fold_in(key, 1), n=n)
    first = soft_prompt.discrete_tokens(logits, allowed)
    report("discrete_start", soft_prompt.token_prompt(params, first))["text"] = \
        tokenizer.decode(first)
    started = time.time()
    logits, _ = soft_prompt.optimize(relaxed, params, logits, batch, steps=g.discrete_steps,
                                     learning_rate=g.discrete_lr, key=key)
    out["discrete_seconds"] = round(time.time() - started, 1)
    ids = soft_prompt.discrete_tokens(logits, allowed)
    report("discrete", soft_prompt.token_prompt(params, ids))["text"] = tokenizer.decode(ids)
    return out


def classifier_free(params, cfg, tokenizer, g, seed: int) -> dict:
    """Raw-form sum accuracy at each guidance scale, and negative-prompt examples."""
    rng = np.random.default_rng(seed + 20)
    pairs = [D.TASKS["add"](rng) for _ in range(g.eval_questions)]
    prompts = [f"{q}=" for q, _ in pairs]
    answers = [a for _, a in pairs]
    out = {"prompts": "raw-form sums 'a+b=' against the empty prompt", "scales": {}}
    for scale in g.cfg_scales:
        preds = guided.generate_text(params, cfg, tokenizer, prompts, scale=scale,
                                     max_new_tokens=g.max_new_tokens)
        acc = D.score(answers, [_answer(p) for p in preds])
        out["scales"][str(scale)] = {"accuracy": acc, "examples": [
            {"prompt": p, "completion": c} for p, c in zip(prompts[:g.examples], preds)]}
        print(f"  cfg scale {scale:<4} accuracy {acc:.3f}  e.g. {preds[0]!r}")
    negatives = [g.negative_prompt] * g.examples
    for scale in (1.0, g.negative_scale):
        preds = guided.generate_text(params, cfg, tokenizer, prompts[:g.examples], scale=scale,
                                     negative_prompts=negatives,
                                     max_new_tokens=g.max_new_tokens)
        out[f"negative_prompt_scale_{scale}"] = {"negative_prompt": g.negative_prompt,
                                                 "completions": preds}
    return out


def constrained(params, cfg, tokenizer, g, seed: int) -> dict:
    """Regex- and JSON-schema-constrained completions against unconstrained ones."""
    rng = np.random.default_rng(seed + 30)
    pairs = [D.TASKS["add"](rng) for _ in range(g.eval_questions)]
    prompts = [f"{q}=" for q, _ in pairs]
    answers = [a for _, a in pairs]
    free = sampling.generate_text(params, cfg, tokenizer, prompts,
                                  max_new_tokens=g.max_new_tokens)
    regex_out, accepted = constraints.generate_text(params, cfg, tokenizer, prompts,
                                                    regex=g.regex,
                                                    max_new_tokens=g.max_new_tokens)
    out = {"regex": {
        "regex": g.regex,
        "unconstrained_matching": float(np.mean([bool(re.fullmatch(g.regex, t)) for t in free])),
        "constrained_matching": float(np.mean([bool(re.fullmatch(g.regex, t))
                                               for t in regex_out])),
        "engine_accepted": float(np.mean(accepted)),
        "unconstrained_accuracy": D.score(answers, [_answer(t) for t in free]),
        "constrained_accuracy": D.score(answers, regex_out),
        "examples": [{"prompt": p, "unconstrained": f, "constrained": c}
                     for p, f, c in zip(prompts[:g.examples], free, regex_out)]}}
    print(f"  regex {g.regex}: matching {out['regex']['unconstrained_matching']:.2f} -> "
          f"{out['regex']['constrained_matching']:.2f}, accuracy "
          f"{out['regex']['unconstrained_accuracy']:.3f} -> "
          f"{out['regex']['constrained_accuracy']:.3f}")
    schema = json.loads(g.json_schema)
    json_prompts = [D.instruction_prompt(q) for q, _ in pairs[:g.json_samples]]
    free = sampling.generate_text(params, cfg, tokenizer, json_prompts,
                                  max_new_tokens=g.json_max_new_tokens,
                                  temperature=g.temperature, seed=seed)
    texts, accepted = constraints.generate_text(params, cfg, tokenizer, json_prompts,
                                                json_schema=schema,
                                                max_new_tokens=g.json_max_new_tokens,
                                                temperature=g.temperature, seed=seed)
    out["json_schema"] = {"schema": schema,
                          "unconstrained_valid": float(np.mean([_valid_json(t, schema)
                                                                for t in free])),
                          "constrained_valid": float(np.mean([_valid_json(t, schema)
                                                              for t in texts])),
                          "engine_accepted": float(np.mean(accepted)),
                          "examples": texts[:g.examples]}
    print(f"  json schema: valid {out['json_schema']['unconstrained_valid']:.2f} -> "
          f"{out['json_schema']['constrained_valid']:.2f}, e.g. {texts[0]}")
    return out


def _valid_json(text: str, schema: dict) -> bool:
    """Whether `text` parses as JSON valid under `schema` (jsonschema when installed, else the
    object's required keys and their JSON types)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    try:
        import jsonschema
    except ImportError:
        types = {"integer": int, "string": str, "boolean": bool, "number": (int, float)}
        return isinstance(value, dict) and all(
            isinstance(value.get(k), types[schema["properties"][k]["type"]])
            for k in schema.get("required", []))
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def real_model(config, g) -> dict:
    """The three techniques on a loaded checkpoint with chat prompts (`guide.real`)."""
    from ptjax.interop import load

    r = g.real
    pretrained = load.load(config.model.init, dtype=config.model.dtype)
    params, cfg, tok = pretrained.params, pretrained.config, pretrained.tokenizer
    params = jax.tree.map(jax.numpy.asarray, params)

    out = {"model": config.model.init}
    # chat prompts rendered by the model's template, as text the tokenizer reads back exactly
    rendered = [D.encode_chat_prompt([("user", q)], tok) for q in r.questions]
    contexts = [tok.decode(ids.tolist()) for ids in rendered]
    batch = soft_prompt.target_batch(tok, contexts, list(r.targets))
    objective = soft_prompt.target_log_likelihood(cfg)
    start = soft_prompt.init_prompt(params, cfg, jax.random.key(config.seed), n=r.prompt_tokens)
    tuned, _ = soft_prompt.optimize(objective, params, start, batch, steps=r.steps,
                                    learning_rate=r.lr)
    out["soft_prompt"] = {"targets": list(r.targets),
                          "objective_no_prompt": soft_prompt.evaluate(objective, params, {},
                                                                      batch),
                          "objective_start": soft_prompt.evaluate(objective, params, start,
                                                                  batch),
                          "objective_tuned": soft_prompt.evaluate(objective, params, tuned,
                                                                  batch),
                          "completions_no_prompt": sampling.generate_text(
                              params, cfg, tok, contexts, max_new_tokens=r.max_new_tokens),
                          "completions_tuned": soft_prompt.generate_text(
                              params, cfg, tok, tuned, contexts,
                              max_new_tokens=r.max_new_tokens)}
    print(f"  real soft prompt objective {out['soft_prompt']['objective_start']:.3f} -> "
          f"{out['soft_prompt']['objective_tuned']:.3f}")
    out["cfg"] = {str(s): guided.generate_text(params, cfg, tok, contexts[:2], scale=s,
                                               negative_prompts=[r.negative_prompt] * 2,
                                               max_new_tokens=r.max_new_tokens)
                  for s in (1.0, r.cfg_scale)}
    texts, accepted = constraints.generate_text(params, cfg, tok, contexts[:2],
                                                json_schema=json.loads(r.json_schema),
                                                max_new_tokens=r.max_new_tokens)
    out["json_schema"] = {"completions": texts, "accepted": accepted}
    print(f"  real cfg: {out['cfg']}\n  real json: {texts}")
    return out


def run(config, workdir: str) -> dict:
    """Train or reuse the demo base, run every guidance technique, write WORKDIR/summary.json."""
    started = time.time()
    os.makedirs(workdir, exist_ok=True)
    g = config.guide
    summary: dict = {}
    tokenizer = D.load_tokenizer(config.data.tokenizer)
    base = demo.pretrain_base(config, workdir, tokenizer)
    params, cfg = jax.tree.map(jax.numpy.asarray, base.params), base.model_cfg
    summary["base_eval_loss"] = float(base.metrics.get("eval/loss", float("nan")))
    print("soft prompts (the base model's weights frozen):")
    summary["soft_prompt"] = soft_prompts(params, cfg, tokenizer, g, config.seed)
    print("classifier-free guidance:")
    summary["cfg"] = classifier_free(params, cfg, tokenizer, g, config.seed)
    print("constrained decoding:")
    summary["constrained"] = constrained(params, cfg, tokenizer, g, config.seed)
    if config.model.init:
        print(f"real model {config.model.init}:")
        summary["real_model"] = real_model(config, g)
    summary["seconds"] = round(time.time() - started, 1)
    trainer.write_summary(os.path.join(workdir, "summary.json"), summary)
    print(f"summary: {os.path.join(workdir, 'summary.json')} ({summary['seconds']} s)")
    return summary
