"""The generation benchmark's record (`ptjax.bench.generation_case`) on the tiny preset.

Why: the benchmark's bandwidth figures are only as good as its byte count, so the count is
checked against one written out from the model's dimensions, not from the parameter tree.
"""

import jax.numpy as jnp
import pytest

from ptjax import bench
from ptjax.models.config import preset

BATCH, PROMPT, NEW = 2, 8, 31  # enough decode steps that decode time is not lost in noise

POSITIVE = ("decode_tokens_per_s", "prefill_tokens_per_s", "e2e_tokens_per_s", "decode_step_ms",
            "bytes_per_decode_step", "weight_bytes_per_step", "kv_bytes_per_step", "decode_gb_s",
            "copy_bandwidth_gb_s", "bandwidth_floor_fraction", "peak_rss_mb")


def expected_step_bytes(cfg, dtype: str) -> int:
    """Bytes a decode step reads, from the dimensions: the layers' projection matrices and
    norms, the final norm and output head, BATCH embedding rows, and the cached keys and values
    (every layer, KV heads x head_dim each) at the mean fill, PROMPT + (NEW + 1) / 2 tokens."""
    d, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    layer = d * q + d * kv + d * kv + q * d + 3 * d * cfg.mlp + 2 * d
    weights = cfg.layers * layer + d + d * cfg.vocab_size + BATCH * d
    fill = PROMPT + (NEW + 1) // 2  # NEW is odd: a whole number of tokens
    cache = cfg.layers * 2 * BATCH * kv * fill
    return (weights + cache) * jnp.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generation_case_fields_and_bytes(dtype):
    r = bench.generation_case("tiny", dtype, BATCH, PROMPT, NEW, runs=3, warmup=1, copy_mib=8)
    assert r["case"] == f"tiny-generate-{dtype}-b{BATCH}-p{PROMPT}-n{NEW}"
    assert r["device"]
    for field in POSITIVE:
        assert r[field] > 0, field
    assert r["bytes_per_decode_step"] == expected_step_bytes(preset("tiny"), dtype)
    assert r["bytes_per_decode_step"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
