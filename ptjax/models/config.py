"""Model dimensions and the named presets configs refer to (`model.preset`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


# The RoPE scalings the model implements and the fields each needs.
ROPE_SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def rope_scaling_spec(rope_type: str, **fields) -> tuple:
    """The hashable `ModelConfig.rope_scaling` value for a scaling kind and its fields."""
    return tuple(sorted({"rope_type": rope_type, **fields}.items()))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a Llama-family decoder; frozen so it can be a static jit argument."""

    vocab_size: int
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 puts biases on q/k/v only
    # RoPE frequency scaling as sorted (key, value) pairs, hashable for jit: () is plain RoPE,
    # (("factor", 2.0), ("rope_type", "linear")) or the llama3 keys (factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings, rope_type="llama3").
    rope_scaling: tuple = ()
    max_position_embeddings: int = 0  # the checkpoint's context length (0 = not stated)
    dtype: str = "float32"  # compute dtype of the matmuls; master weights stay float32
    remat: str = "none"  # "none" | "full" (recompute each layer in the backward pass)
    # Layers as one lax.scan (compile time nearly independent of depth) or an unrolled loop
    # (less step memory for full and LoRA fine-tuning, and on the 2-core CPU up to ~7% faster
    # for an 8-layer model; compile time grows with depth). README, "Deep models".
    scan_layers: bool = True

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported; "
                                 f"choose one of {sorted(ROPE_SCALING_KEYS)}")
            missing = ROPE_SCALING_KEYS[kind] - set(dict(self.rope_scaling))
            if missing:
                raise ValueError(f"rope_scaling ({kind}) needs {sorted(missing)}")
        if self.remat not in ("none", "full"):
            raise ValueError(f"remat must be 'none' or 'full', got {self.remat!r}")


PRESETS = {
    # Unit tests: small enough that a compile takes a second.
    "tiny": ModelConfig(vocab_size=259, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, head_dim=8),
    # The embedded demo: a few million parameters over the built-in byte tokenizer.
    "demo": ModelConfig(vocab_size=259, hidden=192, mlp=512, layers=4, heads=6, kv_heads=2,
                        head_dim=32),
    # The CPU benchmark model.
    "llama-56m": ModelConfig(vocab_size=32000, hidden=512, mlp=1408, layers=8, heads=8, kv_heads=4,
                             head_dim=64),
    # SmolLM2-135M(-Instruct)'s dimensions: the real-model benchmark without reading the file.
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden=576, mlp=1536, layers=30, heads=9,
                                kv_heads=3, head_dim=64, rope_theta=100000.0, norm_eps=1e-5,
                                tie_embeddings=True, max_position_embeddings=8192),
    # Llama-2-7B's dimensions (Mistral-7B's differ in mlp=14336, kv_heads=8): memory plans.
    "llama2-7b": ModelConfig(vocab_size=32000, hidden=4096, mlp=11008, layers=32, heads=32,
                             kv_heads=32, head_dim=128, norm_eps=1e-5),
    # Llama-3.2-1B's dimensions, for GPU runs.
    "llama-1b": ModelConfig(vocab_size=128256, hidden=2048, mlp=8192, layers=16, heads=32,
                            kv_heads=8, head_dim=64, rope_theta=500000.0, norm_eps=1e-5,
                            tie_embeddings=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset with field overrides (e.g. `dtype="bfloat16"`); unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
