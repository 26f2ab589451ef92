"""The keys every trainer config understands, with their defaults.

Config files in `configs/` start from `base_config()` and change what their experiment needs;
`--config.a.b=value` overrides any of these on the command line, and a misspelled key fails
with its name (ml_collections refuses keys that do not exist).
"""

from __future__ import annotations

import ml_collections


def method_options(arg, config_file: str) -> tuple[str, str]:
    """(peft method, quant method) from a config file's `peft=NAME,quant=NAME` argument.

    Why shared: every trainer config (`configs/sft.py`, `reward.py`, `dpo.py`, `ppo.py`,
    `grpo.py`) takes the same two options, and a typo in either must name the file and the
    choices the same way.
    """
    from ptjax import peft

    options = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
    unknown = set(options) - {"peft", "quant"}
    if unknown:
        raise ValueError(f"{config_file}: unknown option(s) {sorted(unknown)}; use peft=NAME "
                         "and quant=NAME")
    method = options.get("peft", "full")
    if method not in peft.METHODS:
        raise ValueError(f"{config_file}: peft={method!r} is not one of {tuple(peft.METHODS)}")
    return method, options.get("quant", "")


def with_overrides(config, overrides: str, what: str) -> ml_collections.ConfigDict:
    """A copy of `config` with `"a.b=value,c.d=value"` applied.

    Why: comparison recipes (`compare_compression`, `compare_alignment`) describe each row as
    settings laid over one config. Values take the type of the key's default, and an unknown key
    fails naming `what` (the row) and the key.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        *sections, name = key.strip().split(".")
        node = c
        for section in sections:
            if section not in node:
                raise KeyError(f"{what}: unknown config key {key.strip()!r}")
            node = node[section]
        if name not in node:
            raise KeyError(f"{what}: unknown config key {key.strip()!r}")
        default = node[name]
        node[name] = (value.lower() in ("1", "true") if isinstance(default, bool)
                      else type(default)(value))
    return c


def base_config() -> ml_collections.ConfigDict:
    """Defaults for a supervised fine-tuning run of the demo-sized model."""
    c = ml_collections.ConfigDict()
    c.trainer = "sft"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A preset name; "" = the checkpoint's own config with model.init, else "demo". With both,
    # the preset must match the checkpoint.
    c.model.preset = ""
    c.model.dtype = "float32"  # compute dtype of the matmuls; master weights stay float32
    c.model.remat = "none"  # or "full"
    c.model.scan_layers = True  # layers as one lax.scan; False unrolls them (compiles per layer)
    c.model.init = ""  # Hugging Face folder, .gguf file or ptjax run to start from ("" = random)

    c.data = ml_collections.ConfigDict()
    # "" = the model's own tokenizer with model.init, else bytes; or "byte", a tokenizer.json
    # path or a Hugging Face folder.
    c.data.tokenizer = ""
    c.data.train = ""  # JSONL: {"prompt","completion"} or {"messages": [...]}
    c.data.eval = ""
    # Over-long examples: "left" cuts the prompt from the left (the completion is kept), "drop"
    # leaves them out; either way the run reports how many, naming the first by file and line.
    c.data.truncate = "left"
    # Row streams per batch (must divide train.batch_size): example i feeds stream i % streams,
    # and each process reads, tokenizes and packs only the streams whose rows its devices hold.
    # The global batch depends on this number, never on the process count; 1 packs every
    # example together (one process builds the whole batch). Multi-host: a multiple of the
    # process count.
    c.data.streams = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.grad_accum = 1
    c.train.log_every = 10
    # Consecutive steps with a non-finite loss or gradient norm (each skipped: no update) after
    # which the run stops with an error; checked at log steps. 0 = never stop.
    c.train.max_bad_steps = 5

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100
    c.eval.max_batches = 16

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.final_lr_fraction = 0.1
    c.optim.weight_decay = 0.01
    c.optim.no_decay = r"(norm|bias|embed)"  # paths that get no weight decay
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.momentum = 0.0  # sgd only
    c.optim.lr_by_path = ()  # ((path regex, peak lr), ...): parameter groups with their own lr

    # Quantization (ptjax.quant), applied to the base before any PEFT method wraps it.
    c.quant = ml_collections.ConfigDict()
    c.quant.method = ""  # "", int8, int4, fp8 (scaled), nf4, fp4 (bitsandbytes' 4-bit)
    c.quant.qat = False  # int8/int4/fp8: fake-quantize trainable weights instead of storing codes
    c.quant.targets = ""  # regex of kernels to quantize ("" = every attention and MLP projection)
    c.quant.granularity = "channel"  # int8/int4/fp8 scales: channel, group or tensor
    c.quant.group_size = 128  # input rows per scale for granularity=group
    c.quant.symmetric = True  # False: int codes with a zero point (asymmetric)
    c.quant.clip = 1.0  # fraction of the absmax (or min/max) range kept; outside saturates
    c.quant.activations = ""  # also round layer inputs per token: int8, int4 or fp8
    c.quant.double_quant = True  # nf4/fp4: quantize the block absmax again (4.127 bits/param)
    # Pruning (ptjax.prune), applied to the base before quantization and PEFT.
    c.prune = ml_collections.ConfigDict()
    c.prune.method = ""  # "", magnitude (per layer), global, random; wanda, sparsegpt (calibrated)
    c.prune.sparsity = 0.5  # fraction of each targeted weight set to zero (unstructured)
    c.prune.structure = ""  # "2:4": N:M along the input dim; "row": `sparsity` in every output
    c.prune.targets = ""  # regex of kernels ("" = every attention and MLP projection)
    c.prune.seed = 0  # prune.method=random
    c.prune.calibration_rows = 64  # wanda/sparsegpt: rows of train.seq_len tokens of train data
    # Gradual pruning while training (Zhu & Gupta): with end_step > 0, masks are recomputed every
    # `every` steps from start_step to end_step, sparsity rising from initial_sparsity to
    # `sparsity` along a cubic; end_step = 0 prunes once, before the first step.
    c.prune.start_step = 0
    c.prune.end_step = 0
    c.prune.every = 10
    c.prune.initial_sparsity = 0.0
    # Parameter-efficient fine-tuning (ptjax.peft); `method` picks one, the rest are its knobs.
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "full"  # full, lora, dora, ia3, adapter, prompt, ptuning, prefix
    c.peft.freeze = ""  # full: regex of parameters to keep frozen, e.g. "^(embed|layers_0)/"
    c.peft.targets = ""  # lora/dora/ia3: regex of weights to wrap ("" = the method's default)
    c.peft.rank = 16
    c.peft.alpha = 32.0
    c.peft.dropout = 0.0
    c.peft.init = "kaiming"  # or gaussian
    c.peft.rslora = False
    c.peft.placement = "houlsby"  # adapter: houlsby or pfeiffer
    c.peft.bottleneck = 64
    c.peft.num_virtual = 16  # prompt / ptuning / prefix
    c.peft.prompt_init = "vocab"  # prompt: random, vocab or text
    c.peft.prompt_text = ""
    c.peft.encoder = "mlp"  # ptuning: mlp or lstm
    c.peft.ptuning_placement = "template"  # ptuning: template, or prepend (PEFT's P_TUNING)
    c.peft.encoder_hidden = 128
    c.peft.reparam_hidden = 0  # prefix: >0 trains through an MLP of this width

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    # Resume despite these changes (comma-separated fields or prefixes of the run record, e.g.
    # "optim,train.steps"); any other change since the checkpoint was written is refused.
    c.checkpoint.allow_changes = ""
    c.checkpoint.keep_best = False  # also keep the lowest-eval-loss checkpoint in WORKDIR/best

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["heads", "tensor"],
                        ["kv", "tensor"], ["mlp", "tensor"], ["vocab", "tensor"],
                        ["length", None], ["norm", None]]
    return c
