"""Greedy generation on SmolLM2-135M-Instruct equals transformers' (optional: needs torch,
transformers and the GGUF file named by PTJAX_SMOLLM2_GGUF; `pip install -e '.[parity]'`).

Both sides load the same GGUF dequantized to float32 and get the same prompt ids (ptjax's chat
template rendering); 48 new tokens must agree, except after a near-tie (top-2 logit gap < 1e-4 in
transformers' logits at the first differing step), where float rounding may pick either token.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
GGUF = os.environ.get("PTJAX_SMOLLM2_GGUF", "")
pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF), reason="set PTJAX_SMOLLM2_GGUF")

CHATS = [
    [("user", "What is the capital of France?")],
    [("system", "You are a concise assistant."), ("user", "Name three primary colors.")],
    [("user", "Write a haiku about the sea.")],
    [("user", "sort 48213"), ("assistant", "12348"), ("user", "Explain how you sorted them.")],
]
NEW_TOKENS = 48


def test_greedy_equals_transformers():
    import jax

    from ptjax import sampling
    from ptjax.data import encode_chat_prompt
    from ptjax.interop import load

    jax.config.update("jax_default_matmul_precision", "highest")
    ours = load.load(GGUF)
    prompts = [encode_chat_prompt(chat, ours.tokenizer) for chat in CHATS]
    fn = sampling.make_generate_fn(ours.config, NEW_TOKENS, eos_id=ours.tokenizer.stop_ids,
                                   pad_id=ours.tokenizer.pad_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32)
    model.eval()
    for ids in prompts:
        tokens, mask = sampling.left_pad([ids], len(ids), ours.tokenizer.pad_id)
        result = fn(ours.params, tokens, mask, jax.random.key(0))
        got = np.asarray(result["tokens"][0])[:int(result["lengths"][0])]
        with torch.no_grad():
            out = model.generate(torch.tensor(ids[None], dtype=torch.long), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=list(ours.tokenizer.stop_ids),
                                 pad_token_id=ours.tokenizer.pad_id, output_logits=True,
                                 return_dict_in_generate=True)
        want = out.sequences[0, len(ids):].numpy()
        n = min(len(want), len(got))
        differ = np.nonzero(got[:n] != want[:n])[0]
        if len(differ):
            step = int(differ[0])
            top2 = torch.topk(out.logits[step][0], 2).values
            gap = float(top2[0] - top2[1])
            assert gap < 1e-4, f"diverged at step {step} with a top-2 gap of {gap}"
        else:
            np.testing.assert_array_equal(got, want)  # same tokens, same stopping point
