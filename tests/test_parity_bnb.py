"""NF4 with double quantization against bitsandbytes itself (optional: needs torch and
bitsandbytes; run with the torch venv: `python -m pytest -q tests/test_parity_bnb.py`).

The 4-bit codes must equal bitsandbytes' exactly. The 8-bit absmax codes follow bitsandbytes'
CUDA kernel (nearest code of its dynamic map, as `tests/test_quant.py` checks against a numpy
transcription); bitsandbytes' CPU build finds the code by an approximate binary search that now
and then returns the neighbour of the nearest one, so against it a few blocks differ by one code.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from ptjax.quant import nf4  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_codes_equal_bitsandbytes(quant_type):
    torch.manual_seed(0)
    weight = torch.randn(384, 576) * 0.03  # PyTorch's [out, in]
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                 quant_type=quant_type)
    node = nf4.quantize(jnp.asarray(weight.numpy().T.copy()), quant_type)
    if quant_type == "nf4":
        np.testing.assert_array_equal(np.asarray(node.codes), packed.numpy().reshape(-1))
    else:  # FP4's two zeros (+0, -0) may be chosen differently for tiny values; both are 0
        ours = np.asarray(nf4.unpack_nibbles(np.asarray(node.codes), weight.numel()))
        theirs = np.asarray(nf4.unpack_nibbles(packed.numpy().reshape(-1), weight.numel()))
        np.testing.assert_array_equal(nf4.FP4_LEVELS[ours], nf4.FP4_LEVELS[theirs])
    ours, theirs = np.asarray(node.absmax).astype(int), state.absmax.numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 1
    assert (ours == theirs).mean() > 0.99
    np.testing.assert_allclose(float(node.offset), float(state.offset), rtol=1e-6)
    dequantized = bnb_functional.dequantize_4bit(packed, state).numpy()
    np.testing.assert_allclose(np.asarray(node.dequantize_transposed()), dequantized,
                               atol=0.01 * float(weight.abs().max()))


def _tiny_nf4_folder(tmp_path):
    import jax

    from ptjax import quant
    from ptjax.interop import hf
    from ptjax.models import llama
    from ptjax.models.config import preset
    from ptjax.train.config import base_config

    cfg = preset("tiny")
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    qc = base_config().quant
    qc.method = "nf4"
    quantized = quant.apply(params, qc)
    hf.save_params(quantized, cfg, str(tmp_path))
    return cfg, quantized


def test_transformers_loads_ptjax_nf4_folders_as_linear4bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ptjax.models import llama

    cfg, quantized = _tiny_nf4_folder(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(llama.forward(quantized, cfg, tokens))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_ptjax_loads_a_folder_transformers_quantized(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ptjax.interop import hf
    from ptjax.models import llama

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", dtype=torch.float32,
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model.save_pretrained(tmp_path / "nf4")
    params = hf.load_params(str(tmp_path / "nf4"))
    cfg = hf.config_from_hf(str(tmp_path / "nf4"))
    tokens = np.random.default_rng(1).integers(3, 128, (2, 10))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(llama.forward(params, cfg, tokens)), theirs,
                               rtol=1e-4, atol=1e-4)
