"""Preference pairs as fixed-shape batches for reward models and DPO.

A pair is the prompt followed by the chosen response and the prompt followed by the rejected
one, each encoded exactly as `encode_sft` lays out an SFT example (so the response, EOS
included, is what the loss mask marks). Batches keep one sequence per row, right-padded, with
the chosen and rejected halves under their own keys: splitting a batch into microbatches then
keeps every pair together.
"""

from __future__ import annotations

import numpy as np

from ptjax.data.encode import encode_sft, encode_sft_status
from ptjax.data.records import PreferenceRecord

Pair = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
SIDES = ("chosen", "rejected")


def encode_pair(record: PreferenceRecord, tokenizer, max_len: int) -> Pair:
    """`((chosen ids, chosen response mask), (rejected ids, rejected response mask))`."""
    return tuple(encode_sft(record.as_sft(side), tokenizer, max_len) for side in SIDES)


def encode_pair_status(record: PreferenceRecord, tokenizer, max_len: int,
                       truncate: str = "left") -> tuple[Pair | None, str]:
    """`(pair or None, status)`: both sides cut to fit as `data.truncate` says (`encode_sft_status`);
    "dropped" when either side is, else "cut" when either side is, else "ok". A pair is kept or
    dropped whole, so no side ever trains without the other."""
    sides = [encode_sft_status(record.as_sft(side), tokenizer, max_len, truncate)
             for side in SIDES]
    statuses = {status for _, status in sides}
    status = next((s for s in ("dropped", "cut") if s in statuses), "ok")
    if status == "dropped":
        return None, status
    return tuple(encoded for encoded, _ in sides), status


def pair_batch(pairs: list[Pair], seq_len: int, batch_size: int | None = None,
               extras: dict | None = None) -> dict:
    """`{side}_tokens` int32, `{side}_mask` int32 (1 = real token), `{side}_response` bool
    [b, seq_len] for both sides, and `weight` float32 [b] (0 for filler pairs when `batch_size`
    is larger than the pairs given: they are all padding and never count). `extras` maps names
    to per-pair float values aligned with `pairs` (precomputed reference log-probs), batched
    as float32 [b]."""
    b = batch_size or len(pairs)
    out = {}
    for k, side in enumerate(SIDES):
        tokens = np.zeros((b, seq_len), np.int32)
        mask = np.zeros((b, seq_len), np.int32)
        response = np.zeros((b, seq_len), bool)
        for i, pair in enumerate(pairs):
            ids, loss_mask = pair[k]
            n = min(len(ids), seq_len)
            tokens[i, :n], mask[i, :n], response[i, :n] = ids[:n], 1, loss_mask[:n]
        out.update({f"{side}_tokens": tokens, f"{side}_mask": mask, f"{side}_response": response})
    out["weight"] = (np.arange(b) < len(pairs)).astype(np.float32)
    for name, values in (extras or {}).items():
        out[name] = np.zeros(b, np.float32)
        out[name][:len(pairs)] = values
    return out


class PairBatches:
    """An endless, resumable stream of batches of `batch_size` pairs.

    Epoch e visits the pairs in the order `default_rng([seed, e]).permutation(n)` and drops an
    incomplete last batch, so everything follows from `(seed, step)` and `state()` is all a
    checkpoint needs (as with `PackedBatches`).
    """

    def __init__(self, pairs: list[Pair], seq_len: int, batch_size: int, seed: int,
                 extras: dict | None = None):
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} preference pairs are fewer than one batch of "
                             f"{batch_size} (train.batch_size)")
        self.pairs, self.seq_len, self.batch_size, self.seed = list(pairs), seq_len, batch_size, seed
        self.batches_per_epoch = len(self.pairs) // batch_size
        self.extras = {k: np.asarray(v, np.float32) for k, v in (extras or {}).items()}
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, index = divmod(self._step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        self._step += 1
        return pair_batch([self.pairs[i] for i in chosen], self.seq_len,
                          extras={k: v[chosen] for k, v in self.extras.items()})

    def state(self) -> dict:
        return {"step": self._step}

    def restore(self, state: dict) -> None:
        self._step = int(state["step"])


def pair_eval_batches(pairs: list[Pair], seq_len: int, batch_size: int,
                      extras: dict | None = None) -> list[dict]:
    """Every pair once, in order; the last batch is filled with weight-0 pairs."""
    extras = {k: np.asarray(v, np.float32) for k, v in (extras or {}).items()}
    return [pair_batch(pairs[i:i + batch_size], seq_len, batch_size,
                       {k: v[i:i + batch_size] for k, v in extras.items()})
            for i in range(0, len(pairs), batch_size)]
