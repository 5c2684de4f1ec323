"""The in-memory data model: a catalogue, a preprocessed data set, and its leave-one-out split.

Users and items are dense indices 0..n-1 assigned from sorted original ids; original ids only
appear at the edges (reading files, writing predictions, the API).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Stage = Literal["valid", "test"]


def id_sort_key(value: str) -> tuple[int, int, str]:
    """Sort numeric ids numerically and the rest as strings (deterministic, never set order)."""
    if value.isascii() and value.isdigit():
        return (0, int(value), value)  # "01" and "1" both exist: the string breaks the tie
    return (1, 0, value)


@dataclass
class Catalog:
    """Item texts and attributes, indexed by dense item index.

    ``kind`` is "movies", "products" or "items" and decides how prompts render an item.
    ``attributes[i]`` holds e.g. {"genres": [...], "year": 1995} or {"categories": [...]}.
    """

    item_ids: list[str]
    titles: list[str]
    attributes: list[dict[str, Any]]
    kind: str = "items"
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int:
        """Dense index of an original item id; KeyError if unknown."""
        if self._index is None:
            self._index = {iid: i for i, iid in enumerate(self.item_ids)}
        return self._index[str(item_id)]

    def has(self, item_id: str) -> bool:
        try:
            self.index_of(item_id)
        except KeyError:
            return False
        return True

    def tags(self, i: int) -> list[str]:
        """Genres or categories of item ``i`` (whichever the data set has)."""
        attrs = self.attributes[i]
        return list(attrs.get("genres") or attrs.get("categories") or [])


@dataclass
class Dataset:
    """A preprocessed data set: chronological item sequences per user, plus the catalogue."""

    name: str
    user_ids: list[str]
    sequences: list[np.ndarray]  # per user: int64 item indices, oldest first
    catalog: Catalog
    protocol: dict[str, Any]
    user_attributes: list[dict[str, Any]] | None = None
    _user_index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def user_index(self, user_id: str) -> int:
        if self._user_index is None:
            self._user_index = {u: i for i, u in enumerate(self.user_ids)}
        return self._user_index[str(user_id)]

    def stats(self) -> dict[str, Any]:
        lengths = np.array([len(s) for s in self.sequences])
        n = self.n_users * self.n_items
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": round(self.n_interactions / n, 6) if n else 0.0,
            "sequence_length": {
                "min": int(lengths.min()),
                "mean": round(float(lengths.mean()), 3),
                "median": float(np.median(lengths)),
                "max": int(lengths.max()),
            },
            "protocol": self.protocol,
        }


@dataclass
class Split:
    """Leave-one-out: last item = test, second-to-last = validation, the rest = train.

    ``train`` never holds a validation or test item. For the test stage the history is
    train + the validation item (everything before the target); models are fitted on ``train`` only.
    """

    dataset: Dataset
    train: list[np.ndarray]
    valid_targets: np.ndarray
    test_targets: np.ndarray

    @classmethod
    def leave_one_out(cls, dataset: Dataset) -> Split:
        seqs = dataset.sequences
        if any(len(s) < 3 for s in seqs):
            raise ValueError("leave-one-out needs at least 3 items per user (5-core guarantees 5)")
        return cls(
            dataset=dataset,
            train=[s[:-2] for s in seqs],
            valid_targets=np.array([s[-2] for s in seqs], dtype=np.int64),
            test_targets=np.array([s[-1] for s in seqs], dtype=np.int64),
        )

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    def histories(self, stage: Stage) -> list[np.ndarray]:
        """Everything each user did before the target of ``stage``."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return [s[:-1] for s in self.dataset.sequences]
        raise ValueError(f"unknown stage {stage!r}; use 'valid' or 'test'")

    def targets(self, stage: Stage) -> np.ndarray:
        if stage == "valid":
            return self.valid_targets
        if stage == "test":
            return self.test_targets
        raise ValueError(f"unknown stage {stage!r}; use 'valid' or 'test'")
