"""The one error a model file can raise: it names the file and says what is wrong in one line."""

from __future__ import annotations

from pathlib import Path


class ModelFileError(Exception):
    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")
