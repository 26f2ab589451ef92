"""Generate text from any model ptjax loads: a GGUF file, a Hugging Face folder or a ptjax run.

    python -m ptjax.generate --model=$(python -m ptjax.interop.fetch smollm2) \
        --chat --prompt="What is the capital of France?"
    python -m ptjax.generate --model=runs/smollm_lora --chat --interactive
    python -m ptjax.generate --model=model.gguf --adapter=runs/x/adapter --prompt="Once upon"

The completion is printed as it is produced. `--chat` renders the prompt through the model's chat
template (a system line with `--system`); `--temperature=0` (the default) is greedy, otherwise
`--top_k`/`--top_p` filter the sampled distribution. Generation stops at any of the model's stop
ids (generation_config.json's list), at any `--stop` string, or after `--max_new_tokens`.
`--interactive` keeps a conversation going (an empty line or EOF ends it). Unset sampling flags
follow the model's generation_config.json (greedy when it has none or does not sample).

Guidance (`ptjax.guidance`): `--cfg_scale=1.5` samples with classifier-free guidance against
the empty prompt, or against `--negative_prompt` (rendered like the prompt); `--regex`,
`--json_schema` or `--grammar` (Lark or GBNF; inline text or a file path) restrict the
completion to strings the constraint accepts:

    python -m ptjax.generate --model=... --chat --prompt="Capital of France as JSON" \
        --json_schema='{"type": "object", "properties": {"capital": {"type": "string"}}}'
"""

from __future__ import annotations

import functools
import os

import jax
from absl import app, flags

from ptjax import sampling
from ptjax.data import encode_chat_prompt, encode_prompt
from ptjax.interop import load
from ptjax.streaming import Streamer

_MODEL = flags.DEFINE_string("model", None, "GGUF file, Hugging Face folder or ptjax run directory.")
_ADAPTER = flags.DEFINE_string("adapter", "", "PEFT adapter folder to apply (LoRA, DoRA, IA3, soft prompts).")
_PROMPT = flags.DEFINE_string("prompt", "", "The prompt (the first user turn with --chat).")
_CHAT = flags.DEFINE_bool("chat", False, "Render the prompt with the model's chat template.")
_SYSTEM = flags.DEFINE_string("system", "", "A system message for --chat.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "A chat loop on stdin (implies --chat).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy (default: the model's "
                                  "generation_config.json, greedy without one).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty on tokens already seen (1 = off).")
_SAMPLING_FLAGS = {"temperature": _TEMPERATURE, "top_k": _TOP_K, "top_p": _TOP_P,
                   "repetition_penalty": _REPETITION}
_STOP = flags.DEFINE_multi_string("stop", [], "Stop when the completion contains this string.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1 = off "
                                "unless --negative_prompt is given).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Guide away from this prompt (the "
                                "unconditional stream of --cfg_scale).")
_REGEX = flags.DEFINE_string("regex", "", "Constrain the completion to this regular expression.")
_JSON_SCHEMA = flags.DEFINE_string("json_schema", "", "Constrain the completion to JSON valid "
                                   "under this schema (JSON text or a file path).")
_GRAMMAR = flags.DEFINE_string("grammar", "", "Constrain the completion to this Lark/GBNF "
                               "grammar (text or a file path).")


def _text_or_file(value: str) -> str:
    """The flag's value, or the file's contents when it names a file."""
    if value and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def sampling_settings(generation: dict) -> dict:
    """The decoding settings: each flag the user set, else the model's generation_config.json
    (its temperature/top-k/top-p only when it says `do_sample`, as transformers does), else greedy.

    Why: chat models ship the decoding they were tuned for; a command that ignored it would make
    every model look worse than it is, and one that ignored the flags would not be a tool.
    """
    sample = bool(generation.get("do_sample"))
    settings = {"temperature": float(generation.get("temperature") or 1.0) if sample else 0.0,
                "top_k": int(generation.get("top_k") or 0) if sample else 0,
                "top_p": float(generation.get("top_p") or 1.0) if sample else 1.0,
                "repetition_penalty": float(generation.get("repetition_penalty") or 1.0)}
    for name, flag in _SAMPLING_FLAGS.items():
        if flags.FLAGS[name].present:
            settings[name] = flag.value
    return settings


def reply(pretrained, prompt_ids, streamer: Streamer, key, settings: dict, negative_ids=None,
          constraint=None) -> str:
    """Stream one completion of `prompt_ids` (int32 ids) and return its text; with
    `negative_ids`, guided by `--cfg_scale` away from them; with `constraint`, restricted."""
    tokenizer = pretrained.tokenizer
    streamer.reset()
    combine = None
    if negative_ids is None:
        tokens, mask = sampling.left_pad([prompt_ids], len(prompt_ids), tokenizer.pad_id)
    else:
        from ptjax.guidance import cfg as guided

        tokens, mask = guided.stack_streams([prompt_ids], [negative_ids], tokenizer.pad_id)
        combine = functools.partial(guided.combine_logits, scale=_CFG_SCALE.value)
    if constraint is not None:
        constraint.reset()
    sampling.generate(pretrained.params, pretrained.config, tokens, mask, key,
                      max_new_tokens=_MAX_NEW.value, eos_id=tuple(streamer.stop_ids),
                      pad_id=tokenizer.pad_id, on_token=streamer, combine_streams=combine,
                      allowed_tokens=constraint, **settings)
    return streamer.finish()


def guidance_constraint(pretrained):
    """The `--regex`/`--json_schema`/`--grammar` constraint for one row (None without)."""
    if not (_REGEX.value or _JSON_SCHEMA.value or _GRAMMAR.value):
        return None
    from ptjax.guidance import constraints

    return constraints.constraint_from(
        pretrained.tokenizer, batch=1, vocab_size=pretrained.config.vocab_size,
        regex=_REGEX.value, json_schema=_text_or_file(_JSON_SCHEMA.value),
        grammar=_text_or_file(_GRAMMAR.value))


def guided() -> bool:
    """Whether the flags ask for classifier-free guidance."""
    return _CFG_SCALE.value != 1.0 or bool(_NEGATIVE.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pretrained = load.load(_MODEL.value, adapter=_ADAPTER.value, dtype=_DTYPE.value)
    tokenizer = pretrained.tokenizer
    streamer = Streamer(tokenizer, _STOP.value)
    settings = sampling_settings(pretrained.generation)
    key = jax.random.key(_SEED.value)
    constraint = guidance_constraint(pretrained)
    chat = _CHAT.value or _INTERACTIVE.value
    if not chat:
        if not _PROMPT.value:
            raise app.UsageError("--prompt is required (or use --interactive)")
        negative = encode_prompt(_NEGATIVE.value, tokenizer) if guided() else None
        reply(pretrained, encode_prompt(_PROMPT.value, tokenizer), streamer, key, settings,
              negative, constraint)
        return
    messages = [("system", _SYSTEM.value)] if _SYSTEM.value else []
    turn = 0
    user = _PROMPT.value
    while True:
        if not user:
            if not _INTERACTIVE.value:
                raise app.UsageError("--prompt is required (or use --interactive)")
            try:
                user = input("> ").strip()
            except EOFError:
                return
            if not user:
                return
        messages.append(("user", user))
        negative = None
        if guided():  # the same conversation with the negative prompt as this turn
            negative = encode_chat_prompt(messages[:-1] + [("user", _NEGATIVE.value)], tokenizer)
        answer = reply(pretrained, encode_chat_prompt(messages, tokenizer), streamer,
                       jax.random.fold_in(key, turn), settings, negative, constraint)
        if not _INTERACTIVE.value:
            return
        messages.append(("assistant", answer))
        user, turn = "", turn + 1


if __name__ == "__main__":
    flags.mark_flag_as_required("model")
    app.run(main)
