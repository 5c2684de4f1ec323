"""Instruction data for PALR fine-tuning, from the **training split only**.

Three tasks, written as JSONL records (``instruction``, ``input``, ``output``) that Hugging Face/TRL
users recognise, plus the fields palr's trainer uses (``candidates``, ``target``):

* ``recommend``            (PALR v1): history -> the next items.
* ``recommend_retrieval``  (PALR v2): history + profile + candidates -> the items to pick, in order.
* ``verbalizer``           history + profile + candidates -> the next item (one answer token: the
  candidate's label; for the embedded model the label is the item's own token ``<iN>``).

Training examples come from two sources (``ExampleConfig.source``):

The default is ``prefixes``: on held-out validation users of ml-100k and ml-latest-small the PALR with prefix
examples beat ``both`` and ``valid`` (one genuine example per user is too little data for the embedded model;
benchmarks/RESULTS.md, issue 11). Genuine candidates stay one flag away, leak-checked.

* ``valid`` (genuine candidates): the validation users of the *fit share* (the held-out share,
  :func:`palr.rank.trees.split_users`, never trains; it picks the epoch and the fusion), history = the
  training sequence, target = the validation item, candidates = the retriever's own top-K for that
  history -- the retriever was fitted on the training split, so the validation item was not in its
  training data, exactly as at test time. A target the retriever missed replaces its last candidate (the
  negatives stay genuine). The user's test item never appears (it is skipped as a candidate).
* ``prefixes``: a prefix of a user's training sequence as history and the following item(s) as targets. Candidates are the targets plus hard negatives: the retriever's own top-K for that history
(the retriever was fitted on the same training split), items sharing the targets' genres/categories,
and items co-occurring with them; shuffled with a seeded generator so the target's position teaches
nothing. The user's validation and test items never appear (checked by :func:`check_no_leak`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.console import progress_enabled
from palr.core.io import write_atomic
from palr.core.settings import TASKS, ExampleConfig
from palr.core.topk import top_k
from palr.data.dataset import Split

log = logging.getLogger(__name__)



@dataclass
class Example:
    """One training/evaluation context: user index, history (oldest first), targets, candidates."""

    user: int
    history: np.ndarray
    targets: list[int]
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    profile: str | None = None
    ranks: np.ndarray | None = None  # the retriever's 1-based rank of each candidate (evidence "rank")


def select_users(n_users: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded subset of users (sorted); fraction 1.0 = everybody."""
    if not 0 < fraction <= 1:
        raise ValueError(f"user fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    k = max(1, round(fraction * n_users))
    return np.sort(rng.permutation(n_users)[:k]) if k < n_users else np.arange(n_users)


def training_contexts(split: Split, cfg: ExampleConfig, exclude: Iterable[int] = ()) -> list[Example]:
    """Prefix -> next item(s) contexts inside each selected user's **training** sequence (``exclude``: users
    kept out, the held-out validation share)."""
    out: list[Example] = []
    skip = {int(u) for u in exclude}
    for u in select_users(len(split.train), cfg.user_fraction, cfg.seed):
        if int(u) in skip:
            continue
        seq = split.train[u]
        first = max(1, len(seq) - cfg.positions_per_user)
        for t in range(first, len(seq)):
            out.append(Example(int(u), seq[:t], [int(x) for x in seq[t:t + cfg.n_targets]]))
    return out


def genuine_contexts(split: Split, users: np.ndarray, candidates: np.ndarray, k: int,
                     retrieved_only: bool = False) -> list[Example]:
    """One example per user: training sequence -> validation item, candidates = the retriever's list for it.

    ``candidates`` (U, >= k) are the retriever's ranked lists for the validation stage (row u = user u),
    longer than ``k`` so that the user's test item can be skipped. The target replaces the last candidate
    when the retriever missed it; the list keeps the retriever's order (shuffled later with a seed).
    ``retrieved_only`` (lists that keep the retriever's order and rank): users whose target the retriever missed
    are dropped instead, so no list teaches a rank the retriever did not give; ``ranks`` = positions.
    """
    out = []
    for u in users:
        u = int(u)
        tgt, test = int(split.valid_targets[u]), int(split.test_targets[u])
        row = [int(c) for c in candidates[u] if int(c) != test][:k]
        if tgt not in row:
            if retrieved_only:
                continue
            row[-1] = tgt
        out.append(Example(u, split.train[u], [tgt], np.array(row, dtype=np.int64),
                           ranks=np.arange(1, len(row) + 1) if retrieved_only else None))
    return out


def shuffle_candidates(examples: list[Example], seed: int) -> list[Example]:
    """Seeded shuffle of each example's candidates (the target's slot teaches nothing)."""
    rng = np.random.default_rng(seed + 5)
    for e in examples:
        e.candidates = e.candidates.copy()
        rng.shuffle(e.candidates)
    return examples


class NegativeSampler:
    """Hard negatives from the training data: same tags, co-occurring items (seeded, deterministic)."""

    def __init__(self, split: Split, window: int = 3) -> None:
        cat = split.dataset.catalog
        n = split.n_items
        self.by_tag: dict[str, np.ndarray] = {}
        tags: dict[str, list[int]] = {}
        for i in range(n):
            for t in cat.tags(i)[:3]:
                tags.setdefault(t, []).append(i)
        self.by_tag = {t: np.array(v) for t, v in tags.items()}
        self.item_tags = [cat.tags(i)[:3] for i in range(n)]
        nbrs: list[set[int]] = [set() for _ in range(n)]
        for s in split.train:  # neighbours within a small window of the training sequences
            for k in range(len(s)):
                for j in range(max(0, k - window), min(len(s), k + window + 1)):
                    if j != k:
                        nbrs[s[k]].add(int(s[j]))
        self.cooc = [np.array(sorted(x), dtype=np.int64) for x in nbrs]
        self._pools: dict[tuple[str, ...], np.ndarray] = {}

    def _pool(self, item: int) -> np.ndarray:
        key = tuple(self.item_tags[item])
        if key not in self._pools:  # items share tag sets: one union per distinct set
            parts = [self.by_tag[t] for t in key if t in self.by_tag]
            self._pools[key] = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return self._pools[key]

    @staticmethod
    def _sample(pool: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        """Up to k distinct items of ``pool`` (draws with replacement, then dedupes: O(k), not O(len(pool)))."""
        if not len(pool) or k <= 0:
            return []
        if len(pool) <= k:
            return pool.tolist()
        return list(dict.fromkeys(pool[rng.integers(0, len(pool), size=2 * k)].tolist()))[:k]

    def same_tag(self, item: int, k: int, rng: np.random.Generator) -> list[int]:
        return self._sample(self._pool(item), k, rng)

    def co_occurring(self, item: int, k: int, rng: np.random.Generator) -> list[int]:
        return self._sample(self.cooc[item], k, rng)


def attach_candidates(examples: list[Example], split: Split, retriever: Any, cfg: ExampleConfig,
                      batch_size: int = 512, progress: bool = False) -> list[Example]:
    """Fill ``candidates``; the user's valid/test items never appear.

    ``cfg.lists == "hard"``: targets + hard negatives, shuffled (with ``cfg.evidence == "rank"``: sorted by the
    retriever's score for the prefix instead, ``ranks`` = the retriever's full-catalogue ranks).
    ``cfg.lists == "retriever"``: the retriever's top-K for the prefix in its order (``ranks`` = positions); the
    examples whose target it misses are dropped (the returned list may be shorter); ``cfg.list_noise`` > 0 first adds
    seeded Gumbel noise (times the row's score std) to the retriever's scores."""
    from tqdm.auto import tqdm


    rng = np.random.default_rng(cfg.seed + 1)
    sampler = NegativeSampler(split) if cfg.lists == "hard" else None
    forbidden = np.stack([split.valid_targets, split.test_targets], axis=1)  # (U, 2)
    K = min(cfg.n_candidates, split.n_items)
    kept: list[Example] = []
    noise_rng = np.random.default_rng(cfg.seed + 11)
    for start in tqdm(range(0, len(examples), batch_size), desc="candidates", disable=not progress_enabled(progress), leave=False):
        batch = examples[start:start + batch_size]
        hists = [e.history for e in batch]
        scores = retriever.score(hists)
        if sampler is None and cfg.list_noise > 0:  # the retriever fitted these prefixes: blur its certainty
            scores = np.asarray(scores, np.float64)
            sd = np.nanstd(np.where(np.isfinite(scores), scores, np.nan), axis=1, keepdims=True)
            scores = scores + cfg.list_noise * sd * noise_rng.gumbel(size=scores.shape)
        top, _ = top_k(scores, hists, K + 2)
        for b, (e, row) in enumerate(zip(batch, top)):
            bad = set(forbidden[e.user].tolist()) | set(e.history.tolist())
            if sampler is None:  # the retriever's own list, in its order
                listed = [int(it) for it in row.tolist() if it not in bad][:K]
                if e.targets[0] in listed:
                    e.candidates = np.array(listed, dtype=np.int64)
                    e.ranks = np.arange(1, len(listed) + 1)
                    kept.append(e)
                continue
            chosen: list[int] = list(dict.fromkeys(e.targets))
            extra: list[int] = []
            for t in e.targets:
                extra += sampler.same_tag(t, cfg.genre_negatives, rng) + sampler.co_occurring(t, cfg.cooc_negatives, rng)
            for it in [*extra, *row.tolist()]:  # hard negatives first, then the retriever's top-K in order
                if len(chosen) >= K:
                    break
                if it not in bad and it not in chosen:
                    chosen.append(int(it))
            if len(chosen) < K:  # tiny catalogues: fill with random allowed items
                pool = np.setdiff1d(np.arange(split.n_items), np.array([*bad, *chosen]))
                chosen += rng.choice(pool, size=min(K - len(chosen), len(pool)), replace=False).tolist()
            cands = np.array(chosen, dtype=np.int64)
            rng.shuffle(cands)
            if cfg.evidence == "rank":  # the retriever's order and full-catalogue rank of each candidate
                s = np.where(np.isnan(scores[b]), -np.inf, np.asarray(scores[b], np.float64))
                s[e.history] = -np.inf
                ranks = (s[None, :] > s[cands][:, None]).sum(axis=1) + 1
                order = np.argsort(ranks, kind="stable")
                cands, e.ranks = cands[order], ranks[order]
            e.candidates = cands
            kept.append(e)
    check_no_leak(kept, split)
    return kept


def check_no_leak(examples: Iterable[Example], split: Split, held_out: Iterable[int] = ()) -> None:
    """Raise if a training example holds the user's test item anywhere, a validation item other than in a
    genuine example (history = the whole training sequence, target = the validation item) or in that
    example after :func:`augment_swap` (one history position holds the validation item and the target is the
    training item it replaced), or a held-out user's data."""
    held = {int(u) for u in held_out}
    for e in examples:
        if e.user in held:
            raise AssertionError(f"leak: held-out validation user {e.user} in the training data")
        valid, test = int(split.valid_targets[e.user]), int(split.test_targets[e.user])
        seen = set(e.history.tolist()) | set(e.targets) | set(e.candidates.tolist())
        train = split.train[e.user]
        genuine = len(e.history) == len(train) and e.targets == [valid]
        fut = {test} if genuine or _swapped_genuine(e, train, valid) else {valid, test}
        if fut & seen:
            raise AssertionError(f"leak: user {e.user}'s validation/test item {sorted(fut & seen)} in training data")


def _swapped_genuine(e: Example, train: np.ndarray, valid: int) -> bool:
    """Whether ``e`` is a genuine example after :func:`augment_swap`: the training sequence with the validation
    item at exactly one position ``j``, and ``train[j]`` the (only) target."""
    if len(e.history) != len(train) or len(e.targets) != 1:
        return False
    differ = np.flatnonzero(np.asarray(e.history) != np.asarray(train))
    return len(differ) == 1 and int(e.history[differ[0]]) == valid and e.targets[0] == int(train[differ[0]])


def augment_swap(examples: list[Example], prob: float, rng: np.random.Generator) -> list[Example]:
    """PALR's augmentation: with ``prob``, swap a random history item with the target (a new example)."""
    extra = []
    for e in examples:
        if prob > 0 and len(e.history) > 1 and rng.random() < prob:
            j = int(rng.integers(len(e.history)))
            h = e.history.copy()
            h[j], tgt = e.targets[0], int(e.history[j])
            cands = e.candidates.copy()
            cands[cands == e.targets[0]] = tgt
            extra.append(Example(e.user, h, [tgt, *e.targets[1:]], cands, e.profile, e.ranks))
    return examples + extra


Renderer = Callable[[Example, str], tuple[str, str]]


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:

    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def records(examples: Sequence[Example], tasks: Sequence[str], render: Renderer) -> list[dict[str, Any]]:
    """Instruction records: {"task", "instruction", "input", "output", "user", "candidates", "target"}."""
    out = []
    for e in examples:
        for task in tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {TASKS}")
            prompt, answer = render(e, task)
            instruction, _, inp = prompt.partition("\n")
            out.append({"task": task, "instruction": instruction, "input": inp, "output": answer,
                        "user": e.user, "candidates": e.candidates.tolist(), "target": e.targets[0]})
    return out
