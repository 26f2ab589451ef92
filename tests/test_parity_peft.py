"""Soft prompts against Hugging Face PEFT itself: the same adapter file gives the same logits.

A tiny random float32 `LlamaForCausalLM` is saved with `save_pretrained` and loaded into ptjax
with `hf.load_params`. For PROMPT_TUNING, P_TUNING (MLP encoder) and PREFIX_TUNING, an adapter
made in PEFT (random prompt parameters) is loaded in ptjax, and one made in ptjax (its own
initializers) is loaded in PEFT; logits of the real tokens must agree within 1e-5, and greedy
generation with a prefix must pick the same tokens. Optional: needs torch, transformers and peft
(run with the torch venv: `python -m pytest -q tests/test_parity_peft.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from ptjax import sampling  # noqa: E402
from ptjax.interop import hf, peft_format  # noqa: E402
from ptjax.models import llama  # noqa: E402
from ptjax.peft import prompts  # noqa: E402

N_VIRTUAL = 5
TOL = 1e-5
TOKENS = np.random.default_rng(0).integers(3, 128, (3, 11)).astype(np.int64)
TOKENS[:, 0] = 1  # BOS, which the virtual tokens precede


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random Llama (GQA, untied head) saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def ptjax_base(base_folder):
    cfg = hf.config_from_hf(base_folder)
    return cfg, hf.load_params(base_folder, cfg)


def hf_base(folder):
    """A fresh transformers model per PEFT wrapper (PEFT patches the model it wraps)."""
    return transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def peft_config(method: str):
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    if method == "prompt_tuning":
        return peft_lib.PromptTuningConfig(**common)
    if method == "p_tuning":
        return peft_lib.PromptEncoderConfig(**common, encoder_reparameterization_type="MLP",
                                            encoder_hidden_size=32)
    return peft_lib.PrefixTuningConfig(**common)


def peft_logits(model, tokens, method):
    """PEFT's logits for the real tokens (prompt methods also return the virtual positions)."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    return out if method == "prefix_tuning" else out[:, N_VIRTUAL:]


def _soft_logits(params, cfg, tokens):
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    embeds, positions, prefix = prompts.model_inputs(params, cfg, tokens, positions)
    h = llama.hidden_states(params, cfg, embeds, positions, jnp.ones((b, s), jnp.int32),
                            prefix=prefix)
    return llama.logits_from_hidden(params, cfg, h)


_soft_logits_jit = jax.jit(_soft_logits, static_argnums=1)


def ptjax_logits(params, cfg, tokens, method):
    """ptjax's logits for the real tokens: virtual slots in front (PEFT's placement) for the
    prompt methods, through the same `prompts.model_inputs` the train step and sampler use."""
    ids = np.asarray(tokens, np.int32)
    if method != "prefix_tuning":
        ids = np.stack([prompts.insert_virtual(row, np.zeros(len(row), bool),
                                               prepend=N_VIRTUAL)[0] for row in ids])
    out = np.asarray(_soft_logits_jit(params, cfg, jnp.asarray(ids)))
    return out if method == "prefix_tuning" else out[:, N_VIRTUAL:]


def record(name, got, want, base_logits):
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |ptjax - PEFT| = {diff:.2e}")
    assert np.abs(want - base_logits).max() > 1e-2, "the adapter must change the logits"
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]


@pytest.mark.parametrize("method", METHODS)
def test_peft_adapter_runs_the_same_in_ptjax(method, base_folder, ptjax_base, tmp_path):
    cfg, base = ptjax_base
    model = peft_lib.get_peft_model(hf_base(base_folder), peft_config(method)).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # random prompt parameters, large enough to matter
        for p in model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 2 and p.shape[0] == N_VIRTUAL else 0.2))
    want = peft_logits(model, TOKENS, method)
    model.save_pretrained(tmp_path)
    params = peft_format.load_adapter(base, str(tmp_path))
    got = ptjax_logits(params, cfg, TOKENS, method)
    base_logits = np.asarray(jax.jit(llama.forward, static_argnums=1)(base, cfg, TOKENS))
    record(f"PEFT->ptjax {method}", got, want, base_logits)


def ptjax_adapter(method, cfg, base):
    """A soft prompt from ptjax's own initializers (scaled so that it matters)."""
    key = jax.random.key(2)
    if method == "prompt_tuning":
        return prompts.init_prompt_tuning(base, cfg, key, n=N_VIRTUAL, init="random")
    if method == "p_tuning":
        params = prompts.init_ptuning(base, cfg, key, n=N_VIRTUAL, encoder="mlp", hidden=32)
        inputs = params["prompt"]["inputs"] * 50.0
        return {**params, "prompt": {**params["prompt"], "inputs": inputs}}
    params = prompts.init_prefix(base, cfg, key, n=N_VIRTUAL, reparam_hidden=0)
    return {**params, "prefix": {"embeddings": params["prefix"]["embeddings"] * 50.0}}


@pytest.mark.parametrize("method", METHODS)
def test_ptjax_adapter_runs_the_same_in_peft(method, base_folder, ptjax_base, tmp_path):
    cfg, base = ptjax_base
    params = ptjax_adapter(method, cfg, base)
    got = ptjax_logits(params, cfg, TOKENS, method)
    peft_format.save_adapter(params, cfg, str(tmp_path), method=method)
    model = peft_lib.PeftModel.from_pretrained(hf_base(base_folder), str(tmp_path)).eval()
    want = peft_logits(model, TOKENS, method)
    base_logits = np.asarray(jax.jit(llama.forward, static_argnums=1)(base, cfg, TOKENS))
    record(f"ptjax->PEFT {method}", got, want, base_logits)


def peft_greedy(model, tokens, n_new):
    """PEFT's greedy continuation by re-running its forward on the whole sequence each step:
    what `generate` computes, without its cache plumbing."""
    seq = torch.as_tensor(tokens)
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_greedy_generation_matches_peft(method, base_folder, ptjax_base, tmp_path):
    cfg, base = ptjax_base
    params = ptjax_adapter(method, cfg, base)
    peft_format.save_adapter(params, cfg, str(tmp_path), method=method)
    model = peft_lib.PeftModel.from_pretrained(hf_base(base_folder), str(tmp_path)).eval()
    n_new = 8
    ids = np.asarray(TOKENS, np.int32)
    if method != "prefix_tuning":
        ids = np.stack([prompts.insert_virtual(row, np.zeros(len(row), bool),
                                               prepend=N_VIRTUAL)[0] for row in ids])
    fn = sampling.make_generate_fn(cfg, n_new, eos_id=-1)
    got = np.asarray(fn(params, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                        jax.random.key(0))["tokens"])
    want = peft_greedy(model, TOKENS, n_new)
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(fn(base, jnp.asarray(TOKENS, jnp.int32), jnp.ones(TOKENS.shape, jnp.int32),
                          jax.random.key(0))["tokens"])
    assert (plain != want).any()  # not vacuous: the adapter changes the continuation

    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(TOKENS),
                             attention_mask=torch.ones_like(torch.as_tensor(TOKENS)),
                             max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    generated = out[:, TOKENS.shape[1]:].numpy()
    if (generated != want).any():
        # PEFT 0.21 looks for the cache under `past_key_values`, which transformers 5 renamed
        # `cache`: every decode step re-injects the prompt (prompt tuning) or the prefix is
        # dropped (prefix tuning), so `generate` disagrees with PEFT's own forward.
        pytest.xfail(f"PEFT {peft_lib.__version__} `generate` disagrees with its own forward "
                     f"under transformers {transformers.__version__} (cache renamed)")
    np.testing.assert_array_equal(got, generated)
