"""bitsandbytes' 4-bit checkpoint format: what transformers writes for a model loaded with
`BitsAndBytesConfig(load_in_4bit=True)` and saved with `save_pretrained`.

Why: QLoRA users keep their base in this form; reading it into `NF4` nodes needs no
requantization (the codes are already ours, see `ptjax.quant.nf4`), and writing it back lets
transformers + bitsandbytes load a model ptjax quantized. Per quantized `nn.Linear` `K.weight`:

    K.weight                                   uint8 [ceil(out*in/2), 1]  packed 4-bit codes
    K.weight.absmax                            uint8 (double-quantized) or float32 per 64-block
    K.weight.quant_map                         float32 [16]   the 4-bit levels
    K.weight.nested_absmax                     float32        per 256-block (double quant only)
    K.weight.nested_quant_map                  float32 [256]  the dynamic 8-bit map
    K.weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON object: quant_type,
                                               blocksize, dtype, shape [out, in], nested_*

and `config.json` carries a `quantization_config` with `quant_method: "bitsandbytes"`.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping

import numpy as np

from ptjax.quant import nf4

QUANT_STATE = ".quant_state.bitsandbytes__"
TORCH_DTYPES = ("float32", "bfloat16", "float16")  # weight dtypes the quant state may name


def quant_state_key(weight_key: str, keys) -> str | None:
    """The packed quant-state key of a 4-bit weight, or None when `weight_key` is a plain one."""
    for quant_type in ("nf4", "fp4"):
        key = f"{weight_key}{QUANT_STATE}{quant_type}"
        if key in keys:
            return key
    return None


def check_config(quantization_config: Mapping, source: str) -> None:
    """Only bitsandbytes 4-bit is read; any other quantized checkpoint (8-bit, GPTQ, AWQ, ...)
    is refused, since reading its integer tensors as weights would compute garbage."""
    method = quantization_config.get("quant_method")
    if method != "bitsandbytes" or not quantization_config.get("load_in_4bit"):
        raise NotImplementedError(
            f"{source}: quantization_config {{quant_method: {method!r}, load_in_4bit: "
            f"{quantization_config.get('load_in_4bit')!r}}} is not supported; ptjax reads "
            "bitsandbytes 4-bit (nf4, fp4) checkpoints only")


def read_node(get: Callable[[str], np.ndarray], weight_key: str, state_key: str,
              hf_shape: tuple[int, int], source: str) -> nf4.NF4:
    """An `NF4` node for the [in, out] kernel of a 4-bit `nn.Linear` weight stored [out, in].

    `get(key)` returns a tensor of the checkpoint. Every part is checked against the packed
    state and the model's expected shape; a mismatch names the tensor.
    """
    state = json.loads(bytes(np.asarray(get(state_key), np.uint8).reshape(-1)).decode("utf-8"))

    def bad(what):
        return ValueError(f"{source}: {weight_key}: {what}")

    shape = tuple(state.get("shape") or ())
    if shape != tuple(hf_shape):
        raise bad(f"quant_state shape {list(shape)}, but the config expects {list(hf_shape)}")
    quant_type, blocksize = state.get("quant_type"), state.get("blocksize")
    if quant_type not in nf4.LEVELS:
        raise bad(f"quant_type {quant_type!r} is not nf4 or fp4")
    levels = np.asarray(get(weight_key + ".quant_map"), np.float32)
    if not np.array_equal(levels, nf4.LEVELS[quant_type]):
        raise bad(f"quant_map differs from bitsandbytes' {quant_type} levels")
    n = int(np.prod(shape))
    codes = np.asarray(get(weight_key), np.uint8).reshape(-1)
    if codes.size != (n + 1) // 2:
        raise bad(f"{codes.size} packed bytes for {n} values (expected {(n + 1) // 2})")
    absmax = np.asarray(get(weight_key + ".absmax")).reshape(-1)
    if absmax.size != -(-n // blocksize):
        raise bad(f"{absmax.size} absmax values for {n} values in blocks of {blocksize}")
    node = dict(codes=codes, kernel_shape=(shape[1], shape[0]), quant_type=quant_type,
                blocksize=int(blocksize),
                dtype=state["dtype"] if state.get("dtype") in TORCH_DTYPES else "float32")
    if "nested_offset" not in state:
        return nf4.NF4(absmax=absmax.astype(np.float32), **node)
    nested_map = np.asarray(get(weight_key + ".nested_quant_map"), np.float32)
    if nested_map.shape != (256,):
        raise bad(f"nested_quant_map has shape {nested_map.shape}, expected (256,)")
    if state.get("nested_blocksize") != nf4.ABSMAX_BLOCK:
        raise bad(f"nested_blocksize {state.get('nested_blocksize')} (ptjax reads 256)")
    return nf4.NF4(absmax=absmax.astype(np.uint8),
                   absmax_scale=np.asarray(get(weight_key + ".nested_absmax"), np.float32),
                   offset=np.float32(state["nested_offset"]), code_map=nested_map, **node)


def node_tensors(node: nf4.NF4, weight_key: str) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one NF4 node, as bitsandbytes' `QuantState.as_dict(packed=True)`
    names and shapes them."""
    n_in, n_out = node.kernel_shape
    state = {"quant_type": node.quant_type, "blocksize": node.blocksize,
             "dtype": node.dtype if node.dtype in TORCH_DTYPES else "float32",
             "shape": [n_out, n_in]}
    out = {weight_key: np.asarray(node.codes, np.uint8).reshape(-1, 1),
           weight_key + ".absmax": np.asarray(node.absmax),
           weight_key + ".quant_map": nf4.LEVELS[node.quant_type].copy()}
    if node.double_quantized:
        out[weight_key + ".nested_absmax"] = np.asarray(node.absmax_scale, np.float32)
        out[weight_key + ".nested_quant_map"] = np.asarray(node.dynamic_map(), np.float32)
        state.update(nested_blocksize=nf4.ABSMAX_BLOCK, nested_dtype="float32",
                     nested_offset=float(node.offset))
    packed = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    out[f"{weight_key}{QUANT_STATE}{node.quant_type}"] = packed
    return out


def quantization_config(nodes: list[nf4.NF4]) -> dict:
    """The `quantization_config` transformers needs to load the saved 4-bit weights."""
    first = nodes[0]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": first.quant_type,
            "bnb_4bit_use_double_quant": first.double_quantized,
            # transformers computes in this dtype: the weights' own (what ptjax dequantizes to)
            "bnb_4bit_compute_dtype": first.dtype if first.dtype in TORCH_DTYPES else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"]}
