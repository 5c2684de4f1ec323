"""Most-popular baseline: interaction counts over the training data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import save_file

from palr.retrieval.base import save_params
from palr.runs.safety import load_safetensors


class Popularity:
    name: ClassVar[str] = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {}

    def fit(self, train: Sequence[np.ndarray], n_items: int, *, valid: Any = None, progress: bool = False) -> Popularity:
        allitems = np.concatenate([np.asarray(s, dtype=np.int64) for s in train]) if len(train) else np.zeros(0, np.int64)
        self.counts = np.bincount(allitems, minlength=n_items).astype(np.float32)
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.counts is None:
            raise RuntimeError("fit() the retriever first")
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()

    def save(self, directory: Path) -> None:
        save_params(directory, self.name, self.params())
        save_file({"counts": self.counts}, str(directory / "weights.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> Popularity:
        model = cls()
        model.counts = load_safetensors(directory / "weights.safetensors")["counts"]
        return model
