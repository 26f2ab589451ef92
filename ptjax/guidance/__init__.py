"""Inference-time guidance: steer a frozen model's generation without changing its weights.

`soft_prompt`: optimize a continuous (or Gumbel-softmax discrete) prompt against an objective on
the model's output by backpropagating through the frozen model. `cfg`: classifier-free guidance
and negative prompts, two streams in one batched KV cache. `constraints`: sampling restricted to
a regular expression, JSON schema or grammar (llguidance token masks inside the jitted sampler).
"""

from ptjax.guidance import cfg, constraints, soft_prompt

__all__ = ["cfg", "constraints", "soft_prompt"]
