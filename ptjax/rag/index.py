"""A passage index: embeddings, the passages they encode, the encoder that made them, on disk.

A folder holds `embeddings.safetensors` (the [n, d] matrix, float32 or bfloat16, and for an IVF
index its centroids and cell offsets), `passages.jsonl` (row i's passage, read back with
`read_passages_jsonl`) and `index.json` (format version, shape, dtype, the encoder's
description and fingerprint). Loading refuses an index whose encoder fingerprint is not the one
the caller will embed queries with: scores between two encoders' vectors mean nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax.numpy as jnp
import numpy as np

from ptjax.rag import ivf as ivf_lib
from ptjax.rag import search
from ptjax.rag.corpus import Passage, read_passages_jsonl, write_passages_jsonl

FORMAT_VERSION = 1


@dataclasses.dataclass
class Index:
    """Row i of `embeddings` encodes `passages[i]`. With `ivf`, rows are grouped by k-means cell
    (`ivf_lib.IVFLayout`, whose `order` is then the identity) and `search(method="ivf")` works."""

    embeddings: np.ndarray
    passages: list[Passage]
    encoder: dict = dataclasses.field(default_factory=dict)
    ivf: ivf_lib.IVFLayout | None = None

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.passages):
            raise ValueError(f"index: {len(self.passages)} passages but embeddings of shape "
                             f"{self.embeddings.shape}")

    def __len__(self) -> int:
        return len(self.passages)

    @functools.cached_property
    def device_embeddings(self):
        """The matrix on the default device, put there once (a 1M x 512 float32 copy costs
        more than a search)."""
        return jnp.asarray(self.embeddings)

    def with_ivf(self, lists: int, **build_kwargs) -> "Index":
        """This index with an IVF layout of `lists` cells: rows (and passages) regrouped by cell."""
        layout = ivf_lib.build_layout(self.embeddings, lists, **build_kwargs)
        order = layout.order
        grouped = ivf_lib.IVFLayout(layout.centroids, layout.offsets,
                                    np.arange(len(order), dtype=np.int32))
        return Index(np.ascontiguousarray(self.embeddings[order]),
                     [self.passages[i] for i in order], dict(self.encoder), grouped)

    def search(self, query_embeddings, k: int, method: str = "exact", nprobe: int = 8):
        """`(scores [q, k], rows [q, k])` as numpy, best first: `exact` (chunked brute force)
        or `ivf` (the `nprobe` nearest cells; needs `with_ivf`)."""
        q = jnp.asarray(query_embeddings, jnp.float32)
        e = self.device_embeddings
        if method == "exact":
            s, r = search.exact_topk(q, e, k)
        elif method == "ivf":
            if self.ivf is None:
                raise ValueError("index has no IVF layout (build it with Index.with_ivf)")
            s, r = ivf_lib.ivf_topk(q, e, jnp.asarray(self.ivf.centroids),
                                    jnp.asarray(self.ivf.offsets), k,
                                    min(nprobe, self.ivf.lists))
        else:
            raise ValueError(f"search method must be 'exact' or 'ivf', got {method!r}")
        return np.asarray(s), np.asarray(r)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the index folder (see the module docstring); overwrites the three files."""
        from safetensors.numpy import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {"embeddings": np.ascontiguousarray(self.embeddings)}
        if self.ivf is not None:
            tensors |= {"ivf_centroids": self.ivf.centroids, "ivf_offsets": self.ivf.offsets}
        save_file(tensors, os.path.join(folder, "embeddings.safetensors"))
        write_passages_jsonl(os.path.join(folder, "passages.jsonl"), self.passages)
        meta = {"format_version": FORMAT_VERSION, "count": len(self),
                "dim": int(self.embeddings.shape[1]), "dtype": str(self.embeddings.dtype),
                "ivf_lists": self.ivf.lists if self.ivf is not None else 0,
                "encoder": self.encoder}
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, folder: str | os.PathLike, expect_fingerprint: str | None = None) -> "Index":
        """Read an index folder; with `expect_fingerprint`, refuse one built by another encoder."""
        from safetensors.numpy import load_file

        path = os.path.join(folder, "index.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: not an index folder (no index.json)") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this "
                             f"ptjax reads {FORMAT_VERSION}")
        found = meta.get("encoder", {}).get("fingerprint")
        if expect_fingerprint is not None and found != expect_fingerprint:
            raise ValueError(f"{path}: built with encoder {found!r}, but queries would be "
                             f"embedded with {expect_fingerprint!r}; rebuild the index")
        tensors = load_file(os.path.join(folder, "embeddings.safetensors"))
        layout = None
        if "ivf_centroids" in tensors:
            n = tensors["embeddings"].shape[0]
            layout = ivf_lib.IVFLayout(tensors["ivf_centroids"], tensors["ivf_offsets"],
                                       np.arange(n, dtype=np.int32))
        passages = read_passages_jsonl(os.path.join(folder, "passages.jsonl"))
        return cls(tensors["embeddings"], passages, meta.get("encoder", {}), layout)
