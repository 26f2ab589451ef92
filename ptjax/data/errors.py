"""The one exception type for malformed training data."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Malformed input data, located precisely enough to fix by hand.

    A training run that dies on record 40,000 of a file must say which file, which line and which
    field, so the message is always `path:line: problem` (or `path: problem` when the problem is the
    file as a whole). `path`, `line` and `problem` are also kept as attributes for callers that want
    to report them differently.
    """

    def __init__(self, path: str | os.PathLike, problem: str, line: int | None = None):
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")
