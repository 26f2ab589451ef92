"""compressed-tensors folders against compressed-tensors itself and transformers (optional:
needs torch, transformers and compressed-tensors; run with the torch venv:
`python -m pytest -q tests/test_parity_ct.py`).

Both directions, with no requantization anywhere:
- ptjax writes: compressed-tensors parses the `quantization_config` with its own pydantic models
  (unknown fields are errors), decompresses every module with the compressor its format names
  and gets exactly ptjax's dequantized weights; transformers loads the folder and computes
  ptjax's logits.
- compressed-tensors writes (its own `calculate_qparams` + compressor, as llm-compressor saves):
  ptjax loads `Quantized` nodes whose weights equal compressed-tensors' decompression exactly.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ptjax import quant  # noqa: E402
from ptjax.interop import hf  # noqa: E402
from ptjax.models import llama  # noqa: E402
from ptjax.models.config import preset  # noqa: E402
from ptjax.quant import intq  # noqa: E402
from ptjax.train.config import base_config  # noqa: E402

CFG = preset("tiny")
BASE = jax.device_get(llama.init_params(CFG, jax.random.key(0)))
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 3, CFG.vocab_size))
SCHEMES = {
    "int8-channel": dict(method="int8"),
    "int8-group-asym": dict(method="int8", granularity="group", group_size=16, symmetric=False),
    "int4-group": dict(method="int4", granularity="group", group_size=16),
    "int4-group-asym": dict(method="int4", granularity="group", group_size=8, symmetric=False),
    "int4-channel": dict(method="int4"),
    "int4-tensor-asym": dict(method="int4", granularity="tensor", symmetric=False),
    "fp8-channel": dict(method="fp8"),
}


def _saved(tmp_path, scheme):
    qc = base_config().quant
    for k, v in SCHEMES[scheme].items():
        qc[k] = v
    params = jax.device_get(quant.apply(BASE, qc))
    folder = str(tmp_path / scheme)
    hf.save_params(params, CFG, folder)
    return params, folder


def _node(params, module):
    """The pytree node of an HF module name such as model.layers.0.self_attn.q_proj."""
    parts = module.split(".")
    block, name = ("attn", parts[4][0]) if parts[3] == "self_attn" else ("mlp", parts[4][:-5])
    return params[f"layers_{parts[2]}"][block][name]["kernel"]


def _transformers_logits(folder, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    with torch.no_grad():
        return model, model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


# ----------------------------------------------------------------------------- ptjax writes


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_compressed_tensors_decompresses_ptjax_folders_to_ptjax_weights(tmp_path, scheme):
    params, folder = _saved(tmp_path, scheme)
    config = QuantizationConfig.model_validate(
        json.load(open(f"{folder}/config.json"))["quantization_config"])
    (group,) = config.config_groups.values()
    # the format ptjax names is the one compressed-tensors infers for the scheme
    assert group.format == infer_module_format(torch.nn.Linear, group).value
    compressor = BaseCompressor.get_value_from_registry(group.format)
    tensors = load_file(f"{folder}/model.safetensors")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    assert len(modules) == 7 * CFG.layers
    for module in modules:
        state = {name: tensors[f"{module}.{name}"]
                 for name in compressor.compression_param_names(group)}
        weight = compressor.decompress(state, group)["weight"]
        want = np.asarray(_node(params, module).materialize()).T
        np.testing.assert_array_equal(weight.float().numpy(), want, err_msg=module)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_transformers_loads_ptjax_compressed_tensors_folders(tmp_path, scheme):
    params, folder = _saved(tmp_path, scheme)
    # transformers' default (compressed) load builds packed zero points with their unpacked
    # shape (compressed-tensors 0.20 skips packing them on the meta device), so asymmetric
    # pack-quantized folders, llm-compressor's own included, load only with dequantize=True.
    asym_packed = not SCHEMES[scheme].get("symmetric", True) and "fp8" not in scheme
    model, theirs = _transformers_logits(folder, dequantize=asym_packed)
    np.testing.assert_array_equal(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                                  np.asarray(_node(params, "model.layers.0.self_attn.q_proj")
                                             .materialize()).T)
    np.testing.assert_allclose(theirs, np.asarray(llama.forward(params, CFG, TOKENS)),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- ct writes

CT_SCHEMES = {  # QuantizationArgs, and a format to force (None: the one ct infers)
    "w4a16-group": (dict(num_bits=4, strategy="group", group_size=16), None),
    "w4a16-group-asym": (dict(num_bits=4, strategy="group", group_size=16, symmetric=False),
                         None),
    "w4a16-channel-asym": (dict(num_bits=4, strategy="channel", symmetric=False), None),
    "w8a16-channel": (dict(num_bits=8, strategy="channel"), None),
    "w8a16-tensor-asym": (dict(num_bits=8, strategy="tensor", symmetric=False), None),
    "w8-int-quantized": (dict(num_bits=8, strategy="channel"), "int-quantized"),
    "fp8-channel": (dict(num_bits=8, type="float", strategy="channel"), None),
}


def _ct_folder(tmp_path, name):
    """A folder compressed by compressed-tensors from ptjax's float tiny model, as
    `ModelCompressor.compress_model` + `update_config` write it."""
    args, fmt = CT_SCHEMES[name]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    scheme.format = fmt or infer_module_format(torch.nn.Linear, scheme).value
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    folder = tmp_path / name
    hf.save_params(BASE, CFG, str(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    dense = {}
    w = scheme.weights
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        weight = tensors.pop(key)
        grouped = (weight.reshape(1, -1) if w.strategy == "tensor" else
                   weight.reshape(weight.shape[0], -1, w.group_size or weight.shape[1]))
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), w)
        if w.strategy == "tensor":
            scale, zero = scale.reshape(1), zero.reshape(1)
        state = compressor.compress({"weight": weight, "weight_scale": scale,
                                     "weight_zero_point": zero}, scheme)
        module = key.removesuffix(".weight")
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in state.items()})
        dense[module] = compressor.decompress(state, scheme)["weight"].numpy()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(folder / "config.json"))
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format,
                                 quantization_status="compressed", ignore=["lm_head"])
    config["quantization_config"] = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
        "sparsity_config": {}, "transform_config": {},
        **qconfig.model_dump(exclude=["quant_method"])}
    json.dump(config, open(folder / "config.json", "w"))
    return str(folder), dense


@pytest.mark.parametrize("name", sorted(CT_SCHEMES))
def test_ptjax_reads_compressed_tensors_folders_as_the_same_codes(tmp_path, name):
    folder, dense = _ct_folder(tmp_path, name)
    params = hf.load_params(folder)
    for module, want in dense.items():
        node = _node(params, module)
        assert isinstance(node, intq.Quantized), module
        np.testing.assert_array_equal(np.asarray(node.materialize()).T, want, err_msg=module)
    if CT_SCHEMES[name][0].get("num_bits") == 4 and CT_SCHEMES[name][0].get("symmetric", True):
        codes = np.asarray(_node(params, "model.layers.0.mlp.down_proj").grouped_codes())
        assert codes.min() == -8  # ct's symmetric range reaches -8; ptjax keeps it as stored
    _, theirs = _transformers_logits(folder, dequantize=True)
    np.testing.assert_allclose(np.asarray(llama.forward(params, CFG, TOKENS)), theirs,
                               rtol=1e-4, atol=1e-4)
