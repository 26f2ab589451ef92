"""Fine-tune a pretrained chat model on a task with a programmatic ground truth; accuracy before/after.

The records are chats built from `ptjax.data.synthetic`'s tasks (sorting digits, adding numbers,
...): a system line asking for the bare answer, the question as the user turn and the exact answer
as the assistant turn. They are encoded with the model's own chat template (loss on the assistant
turn only), and accuracy is exact match of greedy replies to held-out questions, generated through
the same template, before fine-tuning and after. Rerunning the command resumes the training stage
and skips the evaluations already in WORKDIR/summary.json.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ptjax import data as D
from ptjax import peft, sampling
from ptjax.recipes import sft
from ptjax.train import trainer

SYSTEM = "Reply with the answer only."


def chat_records(n: int, seed: int, tasks) -> list[dict]:
    """`n` chat records `{"messages": [system, user, assistant]}` over `tasks`, drawn uniformly."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        question, answer = D.TASKS[tasks[int(rng.integers(0, len(tasks)))]](rng)
        records.append({"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def accuracy(params, model_cfg, tokenizer, eval_items, max_new_tokens: int) -> dict:
    """Exact-match accuracy of greedy replies (overall and per task) to the held-out questions."""
    prompts = [D.encode_chat_prompt([("system", SYSTEM), ("user", question)], tokenizer)
               for _, question, _ in eval_items]
    replies = sampling.generate_from_ids(params, model_cfg, tokenizer, prompts,
                                         max_new_tokens=max_new_tokens, batch_size=32)
    answers = [answer for _, _, answer in eval_items]
    result = {"accuracy": D.score(answers, replies),
              "examples": [{"question": q, "answer": a, "reply": r}
                           for (_, q, a), r in list(zip(eval_items, replies))[:4]]}
    for task in sorted({t for t, _, _ in eval_items}):
        idx = [i for i, (t, _, _) in enumerate(eval_items) if t == task]
        result[f"accuracy_{task}"] = D.score([answers[i] for i in idx], [replies[i] for i in idx])
    return result


def held_out(n: int, seed: int, tasks) -> list[tuple[str, str, str]]:
    """`(task, question, answer)` triples, tasks in turn, from a seed the training data never uses."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        question, answer = D.TASKS[task](rng)
        items.append((task, question, answer))
    return items


def run(config, workdir: str) -> dict:
    """Base accuracy, fine-tuning (`peft.method`, usually LoRA), accuracy after; WORKDIR/summary.json."""
    started = time.time()
    task = config.task
    trainer.write_config(config, workdir)  # makes WORKDIR a run `ptjax.interop.load` can read
    model_cfg, base_params, tokenizer, generation = sft.load_base(config)
    summary_path = os.path.join(workdir, "summary.json")
    summary = trainer.read_summary(summary_path)
    eval_items = held_out(task.eval_examples, config.seed + 1000, list(task.names))

    if "base" not in summary:
        summary["base"] = accuracy(base_params, model_cfg, tokenizer, eval_items, task.max_new_tokens)
        trainer.write_summary(summary_path, summary)
    seq_len = config.train.seq_len
    train = [D.encode_sft(r, tokenizer, seq_len)
             for r in chat_records(task.train_examples, config.seed, list(task.names))]
    evals = [D.encode_sft(r, tokenizer, seq_len)
             for r in chat_records(task.eval_loss_examples, config.seed + 1, list(task.names))]
    result = trainer.train(config, os.path.join(workdir, "train"), train, evals,
                           init_params=base_params, model_cfg=model_cfg, tokenizer=tokenizer)
    sft.export(config, workdir, result, tokenizer, generation)
    tuned = peft.finalize(result.params, config.peft)
    after = accuracy(tuned, result.model_cfg, tokenizer, eval_items, task.max_new_tokens)
    summary[config.peft.method] = {
        **after, "eval_loss": float(result.metrics.get("eval/loss", float("nan"))),
        "train_tokens_per_s": float(result.metrics.get("train/tokens_per_s", 0.0)),
        "trainable_params": result.trainable_params}
    summary["gain"] = after["accuracy"] - summary["base"]["accuracy"]
    summary["seconds"] = round(time.time() - started, 1)
    trainer.write_summary(summary_path, summary)
    print(f"accuracy: base {summary['base']['accuracy']:.3f} -> {config.peft.method} "
          f"{after['accuracy']:.3f} (gain {summary['gain']:+.3f}) in {summary['seconds']:.0f} s")
    return summary
