"""Quantization as pure transforms of the parameter pytree.

`apply(params, quant_cfg)` replaces the kernels `quant.targets` matches with weight nodes:
`Quantized` (int8, int4, fp8: real storage, weight-only post-training quantization), `NF4`
(nf4, fp4: bitsandbytes' 4-bit layout, double-quantized absmax by default) or, with `quant.qat`,
`FakeQuant` (trainable float weights seen through the int8/int4/fp8 rounding). Nodes compose with
PEFT: LoRA injected afterwards wraps the quantized node, which is QLoRA for nf4. A pruned kernel
(`prune.Masked`) keeps its mask and gets its weight quantized; every format maps the pruned zeros
to exactly zero. `convert` turns QAT nodes into real storage after training.
"""

from __future__ import annotations

import re

import jax

from ptjax import tree as ptree
from ptjax.prune import Masked
from ptjax.quant import fake, intq, nf4

DEFAULT_TARGETS = r"layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel$"
METHODS = ("", "int8", "int4", "fp8", "nf4", "fp4")
QUANTIZED_NODES = (intq.Quantized, nf4.NF4)


def check(quant_cfg, peft_method: str = "") -> None:
    """Refuse a configuration that cannot run, naming the key (before any work is done)."""
    m = quant_cfg.method
    if m not in METHODS:
        raise ValueError(f"quant.method: unknown method {m!r}; choose one of {METHODS[1:]} "
                         "(or '' for none)")
    if not m:
        return
    if m in ("nf4", "fp4"):
        if quant_cfg.qat:
            raise ValueError(f"quant.qat: QAT fake-quantizes int8, int4 or fp8, not {m}")
        if quant_cfg.activations:
            raise ValueError(f"quant.activations: {m} quantizes weights only")
    else:
        intq.check_format(m, quant_cfg.granularity, quant_cfg.symmetric)
        if quant_cfg.activations:
            intq.check_format(quant_cfg.activations, "tensor", True)
    if not quant_cfg.qat and peft_method == "full":
        raise ValueError(f"quant.method={m!r} stores frozen quantized weights, which full "
                         "fine-tuning cannot update: train an adapter on them (peft.method=lora "
                         "is QLoRA for nf4) or set quant.qat=True for quantization-aware training")
    re.compile(quant_cfg.targets or DEFAULT_TARGETS)


def _node(kernel, c):
    if c.method in ("nf4", "fp4"):
        return nf4.quantize(kernel, c.method, double_quant=c.double_quant)
    if c.qat:
        return fake.FakeQuant(base=kernel, fmt=c.method, granularity=c.granularity,
                              group_size=c.group_size, symmetric=c.symmetric, clip=c.clip,
                              act_fmt=c.activations)
    return intq.quantize(kernel, c.method, c.granularity, c.group_size, c.symmetric, c.clip,
                         act_fmt=c.activations)


def apply(params, quant_cfg):
    """`params` with every targeted kernel quantized (or wrapped for QAT); unchanged when
    `quant.method` is empty. Runs on host arrays, one weight at a time."""
    check(quant_cfg)
    if not quant_cfg.method:
        return params
    regex = re.compile(quant_cfg.targets or DEFAULT_TARGETS)
    hits = []

    def visit(path, w):
        if not regex.search(path):
            return w
        if isinstance(w, Masked) and not ptree.is_weight_node(w.base):  # pruned, then quantized
            hits.append(path)
            return w.replace(base=_node(w.base, quant_cfg))
        if not ptree.is_weight_node(w) and getattr(w, "ndim", 0) == 2:
            hits.append(path)
            return _node(w, quant_cfg)
        return w

    out = ptree.map_with_path(visit, params, nodes_as_leaves=True)
    if not hits:
        raise ValueError(f"quant.targets: {quant_cfg.targets or DEFAULT_TARGETS!r} matches no "
                         "2-D weight")
    return out


def convert(params):
    """Every QAT `FakeQuant` node replaced by the real-storage node it deploys as."""
    return jax.tree.map(lambda x: fake.convert(x) if isinstance(x, fake.FakeQuant) else x, params,
                        is_leaf=lambda x: isinstance(x, fake.FakeQuant))

