"""BM25 lexical retrieval (the `bm25s` package), the baseline beside the dense retriever.

Why keep it: it needs no training, and on text whose topic is named by rare words (made-up
entity names, product codes) it is hard to beat; dense recall is reported beside it.
`bm25s` is imported when an index is built, so `import ptjax` does not need it.
"""

from __future__ import annotations

import numpy as np


class BM25:
    """A BM25 index over `texts` (English stopwords dropped, no stemming); rows are positions
    in `texts`, as in the dense `Index`."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self._bm25s = bm25s
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                             show_progress=False)
        self.size = len(texts)

    def search(self, queries: list[str], k: int):
        """`(scores [q, k] float32, rows [q, k] int32)`, best first."""
        if not 0 < k <= self.size:
            raise ValueError(f"k must be in 1..{self.size} (the corpus size), got {k}")
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        rows, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(scores, np.float32), np.asarray(rows, np.int32)
