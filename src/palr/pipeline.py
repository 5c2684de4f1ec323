"""The PALR pipeline: load a run; recommend for a user or a history; evaluate end to end.

``PALR.load(dir).recommend(user=..., history=..., k=10, explain=True)`` gives the profile, the ranked
items with scores and, with ``explain``, one grounded sentence per item.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr.data import Split, load_split
from palr.errors import InputError, UnknownUserError
from palr.evaluation import DEFAULT_KS, evaluate_retriever, metrics_from_ranks, top_k
from palr.evaluation.report import compare_ranks, statistics_protocol, write_per_user
from palr.ranking import PromptBuilder, Ranker, positional_ranks
from palr.retrieval.base import load_retriever
from palr.runs import check_dataset, dataset_info, read_run, write_json

log = logging.getLogger(__name__)
MAX_USER_ID = 256  # characters of a user id (CLI and HTTP service alike)
MAX_HISTORY = 2000  # item ids in a given history
MAX_ITEM_ID = 128  # characters of an item id
MODES = ("verbalizer", "generative")


def short(text: str, n: int = 40) -> str:
    """``text`` cut to ``n`` characters (messages never echo large input)."""
    return text if len(text) <= n else text[:n] + f"...(+{len(text) - n:,} chars)"


@dataclass
class Recommendation:
    user: str | None
    profile: str
    items: list[dict[str, Any]]  # {"item", "title", "score", "retriever_rank", "explanation"?}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "profile": self.profile, "items": self.items, "notes": self.notes}


class PALR:
    """A loaded PALR run: retriever + profiler + LLM ranker over the data set it was trained on."""

    def __init__(self, run: Path, config: dict[str, Any], split: Split, retriever: Any, ranker: Ranker,
                 ranking: dict[str, Any]) -> None:
        self.run, self.config, self.split, self.retriever, self.ranker, self.ranking = run, config, split, retriever, ranker, ranking
        from palr.profiles import AttributeProfiler

        self.profiler = AttributeProfiler()

    @classmethod
    def load(cls, run: str | Path, data_dir: str | Path | None = None, mode: str | None = None,
             device: str = "auto") -> PALR:
        from palr.finetune.run import read_ranking
        from palr.llm.hf import HFLLM

        if mode is not None and mode not in MODES:
            raise InputError(f"unknown ranking mode {short(mode)!r}: choose {' or '.join(MODES)}")
        run = Path(run)
        cfg = read_run(run, "palr")
        split = load_split(cfg["dataset"]["name"], data_dir or cfg["config"].get("data_dir") or None)
        check_dataset(cfg, split.dataset, run)
        ranking = read_ranking(run)
        retriever = load_retriever(run / "retriever")
        if ranking.get("lora"):
            llm = HFLLM(cfg["config"]["finetune"]["base_model"], adapter=run / ranking["llm_dir"], device=device)
        else:
            llm = HFLLM(run / ranking["llm_dir"], device=device, batch_size=64)
        builder = PromptBuilder(split.dataset.catalog, ranking["style"], ranking["history_len"])
        ranker = Ranker(llm, builder, mode=mode or ranking["mode"], weight=float(ranking["weight"]), batch_size=64,
                        fusion=ranking.get("fusion", "rank"))
        return cls(run, cfg, split, retriever, ranker, ranking)

    # -------------------------------------------------------------------- helpers
    @property
    def catalog(self) -> Any:
        return self.split.dataset.catalog

    def profile_text(self, history: Sequence[int]) -> str | None:
        return self.profiler.profile("-", history, self.catalog).profile if self.ranking.get("profiles", True) else None

    def candidates(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.retriever.score(list(histories)), histories, self.ranking["n_candidates"])

    def resolve_history(self, user: str | None, history: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
        """Dense item indices of a known user's whole history or of the given item ids (unknown ids and
        repeats dropped, with a note); refuses both or neither, an over-long user id or history."""
        notes: list[str] = []
        if (user is None) == (history is None):
            raise InputError("give a user id or a history, not both" if user is not None else
                             "give a user id or a history")
        if history is not None:
            if len(history) > MAX_HISTORY:
                raise InputError(f"a history holds at most {MAX_HISTORY:,} item ids, got {len(history):,}")
            known: list[int] = []
            seen: set[int] = set()
            unknown: list[str] = []
            for h in history:
                if self.catalog.has(h):
                    i = self.catalog.index_of(h)
                    if i not in seen:
                        seen.add(i)
                        known.append(i)
                else:
                    unknown.append(h)
            if unknown:
                shown = ", ".join(short(u, 20) for u in unknown[:5])
                notes.append(f"{len(unknown):,} unknown item id(s) ignored" +
                             (f" (first 5: {shown})" if len(unknown) > 5 else f": {shown}"))
            if len(known) < sum(1 for h in history if self.catalog.has(h)):
                notes.append("repeated item ids counted once")
            return np.asarray(known, dtype=np.int64), notes
        assert user is not None
        if len(user) > MAX_USER_ID:
            raise InputError(f"a user id has at most {MAX_USER_ID} characters, got {len(user):,}")
        try:
            u = self.split.dataset.user_index(user)
        except KeyError:
            raise UnknownUserError(f"unknown user {short(user, 40)!r} in {self.split.dataset.name}; give a history "
                                   "of item ids to recommend for a new user") from None
        return self.split.dataset.sequences[u], notes  # everything the user did

    @property
    def max_k(self) -> int:
        """The most items one recommendation can hold: the candidate count (capped by the catalogue)."""
        return int(min(self.ranking["n_candidates"], self.split.n_items))

    # -------------------------------------------------------------------- recommend
    def recommend(self, user: str | None = None, history: Sequence[str] | None = None, k: int = 10,
                  explain: bool = False) -> Recommendation:
        """Top-k items for a known user (their whole history) or for a given history of item ids.

        ``k`` runs from 1 to :attr:`max_k`; a history that leaves fewer than ``k`` unseen items gives fewer, with a
        note. Invalid input raises :class:`InputError`, an unknown user :class:`UnknownUserError`."""
        if not 1 <= k <= self.max_k:
            raise InputError(f"k must be between 1 and {self.max_k} (the candidate count), got {k}")
        hist, notes = self.resolve_history(user, history)
        if len(hist) == 0:
            notes.append("empty or unknown history: falling back to popularity")
            counts = np.bincount(np.concatenate(self.split.train), minlength=self.split.n_items)
            order = np.lexsort((np.arange(len(counts)), -counts))[:k]
            items = [self._item(i, float(counts[i]), r + 1) for r, i in enumerate(order)]
            return Recommendation(user, "no history", items, notes)
        left = self.split.n_items - len(np.unique(hist))
        if left < self.ranking["n_candidates"]:
            notes.append(f"the history covers {self.split.n_items - left:,} of the {self.split.n_items:,} items: "
                         f"{left:,} unseen item(s) left to rank")
        if left == 0:
            return Recommendation(user, self.profile_text(hist) or "", [], notes)
        cands, cscores = top_k(self.retriever.score([hist]), [hist], min(self.ranking["n_candidates"], left))
        profile = self.profile_text(hist)
        res = self.ranker.rank([hist], [profile], cands, cscores)
        if res.failed[0]:
            notes.append("the LLM failed for this user: the retriever's order stands")
        notes += res.notes
        retr_rank = {int(c): r + 1 for r, c in enumerate(cands[0])}
        items = [self._item(int(i), float(s), retr_rank[int(i)]) for i, s in zip(res.order[0][:k], res.scores[0][:k])]
        if explain:
            from palr.explain import explain_items

            for it, text in zip(items, explain_items(self.catalog, hist, [self.catalog.index_of(x["item"]) for x in items],
                                                     profile, getattr(self.retriever, "item_vectors", None))):
                it["explanation"] = text
        return Recommendation(user, profile or "", items, notes)

    # -------------------------------------------------------------------- catalogue
    @property
    def popularity(self) -> np.ndarray:
        """(n_items,) interactions per item in the training split (computed once)."""
        if getattr(self, "_popularity", None) is None:
            self._popularity = np.bincount(np.concatenate(self.split.train), minlength=self.split.n_items)
        return self._popularity

    def search(self, query: str, limit: int = 20) -> tuple[int, list[int]]:
        """Items whose title holds every word of ``query`` (case-insensitive), most popular first.
        Returns (number of matches, the first ``limit`` item indices)."""
        words = query.lower().split()
        if getattr(self, "_lower_titles", None) is None:
            self._lower_titles = [t.lower() for t in self.catalog.titles]
        hits = [i for i, t in enumerate(self._lower_titles) if all(w in t for w in words)]
        pop = self.popularity
        hits.sort(key=lambda i: (-int(pop[i]), self.catalog.titles[i], i))
        return len(hits), hits[:limit]

    def user_history(self, user: str) -> np.ndarray:
        """A known user's whole history (dense item indices, oldest first)."""
        return self.resolve_history(user, None)[0]

    def _item(self, i: int, score: float, retriever_rank: int) -> dict[str, Any]:
        return {"item": self.catalog.item_ids[i], "title": self.catalog.titles[i], "score": round(score, 5),
                "retriever_rank": retriever_rank}


# ---------------------------------------------------------------------------- evaluation
def evaluate_palr(palr: PALR, stage: str = "test", ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
                  latency_users: int = 100, users: np.ndarray | None = None) -> dict[str, Any] | None:
    """Retriever alone (full ranking), PALR end to end (a retrieval miss counts as a miss), PALR on the users
    whose target was retrieved, and the ranking time per user. ``users``: a subset (all by default); the
    retriever's figures are then on the same subset.

    Under a launcher with several processes (``torchrun``, ``accelerate launch``) each process ranks a block of
    whole batches of users and the main process gathers the per-user results: the figures are those of one
    process. The main process gets the result, the others None."""
    from tqdm.auto import tqdm

    from palr import distributed

    split = palr.split
    everyone = np.arange(split.dataset.n_users) if users is None else np.asarray(users)
    bs = palr.ranker.batch_size
    retr_bs = 512
    # whole batches of both the retriever and the LLM: every batch holds the users it holds in one process
    sel = everyone[distributed.shard(len(everyone), math.lcm(retr_bs, bs))]
    show = progress and distributed.is_main()
    retr = evaluate_retriever(palr.retriever, split, stage, ks, candidates=palr.ranking["n_candidates"],  # type: ignore[arg-type]
                              predictions=max(max(ks), 10), batch_size=retr_bs, users=sel)
    assert retr is not None
    all_hist = split.histories(stage)  # type: ignore[arg-type]
    hist = [all_hist[u] for u in sel]
    targets = split.targets(stage)[sel]  # type: ignore[arg-type]
    cands = retr["candidates"]
    cscores = retr["candidate_scores"]
    profiles = [palr.profile_text(h) for h in hist]
    orders, fused_all, failed, invalid = [], [], [], 0
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(hist), bs), desc=f"PALR ranking ({stage})", disable=not show, leave=False):
        r = palr.ranker.rank(hist[s:s + bs], profiles[s:s + bs], cands[s:s + bs], cscores[s:s + bs])
        orders.append(r.order)
        fused_all.append(r.scores)
        failed.append(r.failed)
        invalid += r.invalid_generations
    K = cands.shape[1]
    order = np.concatenate(orders) if orders else np.empty((0, K), dtype=np.int64)
    scores = np.concatenate(fused_all) if fused_all else np.empty((0, K))
    part = {"order": order, "ranks": positional_ranks(scores, order, targets),
            "hit": np.array([t in row for row, t in zip(cands, targets)], dtype=bool),
            "retr_ranks": retr["ranks"], "retr_predictions": retr["predictions"], "targets": targets,
            "failed": np.concatenate(failed) if failed else np.zeros(0, dtype=bool), "invalid": invalid}
    g = distributed.gather_arrays(part)
    if g is None:
        return None
    rank_s = time.perf_counter() - t0
    ranks, hit = g["ranks"], g["hit"]
    # per-user latency: one user at a time, as a service would (the main process, on its own users)
    rng = np.random.default_rng(0)
    lat_users = rng.choice(len(hist), size=min(latency_users, len(hist)), replace=False)
    lat = []
    for u in lat_users:
        t1 = time.perf_counter()
        palr.ranker.rank([hist[u]], [profiles[u]], cands[u:u + 1], cscores[u:u + 1])
        lat.append(time.perf_counter() - t1)
    retr_name = palr.config["config"]["retriever"]["retriever"]
    results = {
        f"{retr_name} (retriever)": {stage: {**metrics_from_ranks(g["retr_ranks"], ks), f"Recall@{K}": float(hit.mean())}},
        "PALR (end to end)": {stage: {**metrics_from_ranks(ranks, ks), f"Recall@{K}": float(hit.mean())}},
        "PALR (target retrieved)": {stage: metrics_from_ranks(ranks[hit], ks)},
        f"{retr_name} (target retrieved)": {stage: metrics_from_ranks(g["retr_ranks"][hit], ks)},
    }
    timings = {"ranking_s": round(rank_s, 3), "ranking_ms_per_user_batched": round(1000 * rank_s / len(ranks), 3),
               "ranking_ms_per_user_median": round(1000 * statistics.median(lat), 3),
               "latency_users": len(lat), "retriever_eval_s": round(retr["seconds"], 3),
               "processes": distributed.world_size()}
    retr_ranks = g["retr_ranks"]
    per_user_ranks = {f"{retr_name} (retriever)": {stage: retr_ranks}, "PALR (end to end)": {stage: ranks},
                      "PALR (target retrieved)": {stage: ranks[hit]},
                      f"{retr_name} (target retrieved)": {stage: retr_ranks[hit]}}
    return {"results": results, "timings": timings, "order": g["order"], "retriever_predictions": g["retr_predictions"],
            "users": everyone, "targets": g["targets"], "ranks": per_user_ranks, "llm_failures": int(g["failed"].sum()),
            "invalid_generations": g["invalid"]}


def evaluate_palr_run(run: str | Path, out: str | Path | None = None, predictions: str | Path | None = None,
                      retriever_predictions: str | Path | None = None, data_dir: str | Path | None = None,
                      mode: str | None = None, progress: bool = True,
                      per_user: str | Path | None = None) -> dict[str, Any] | None:
    """`palr evaluate --run PALR_RUN`: the test split, retriever and PALR measured in one run; PALR compared
    with its retriever on the same users (paired-bootstrap 95% CIs of the difference and ratio, p-value).

    Under a launcher with several processes the users are sharded (:func:`evaluate_palr`); the main process writes
    the files and returns the document, the others return None."""
    from palr import distributed
    from palr.retrieval.train import write_predictions

    distributed.init()  # before the model loads: each process takes its own GPU
    palr = PALR.load(run, data_dir, mode=mode)
    ev = evaluate_palr(palr, "test", progress=progress)
    if ev is None:
        return None
    split = palr.split
    if predictions:
        write_predictions(predictions, split.dataset, ev["order"], users=ev["users"])
    if retriever_predictions:
        write_predictions(retriever_predictions, split.dataset, ev["retriever_predictions"], users=ev["users"])
    retr_name = palr.config["config"]["retriever"]["retriever"]
    if per_user:
        write_per_user(per_user, split.dataset, ev["users"], ev["targets"],
                       {m: ev["ranks"][m]["test"] for m in ("PALR (end to end)", f"{retr_name} (retriever)")})
    pairs = [("PALR (end to end)", f"{retr_name} (retriever)"),
             ("PALR (target retrieved)", f"{retr_name} (target retrieved)")]
    doc = {"protocol": {**split.dataset.protocol, "ks": list(DEFAULT_KS),
                        "candidates": palr.ranking["n_candidates"],
                        "end_to_end": "a target the retriever did not return counts as a miss",
                        "fusion_weight": palr.ranking["weight"], "fusion": palr.ranking.get("fusion", "rank"),
                        "fusion_weight_chosen_on": "validation users",
                        "ranking_mode": palr.ranker.mode, "prompt_style": palr.ranking["style"]},
           "dataset": dataset_info(split.dataset), "results": ev["results"],
           "comparisons": compare_ranks(ev["ranks"], pairs), "statistics": statistics_protocol(), "timings": ev["timings"],
           "llm_failures": ev["llm_failures"], "invalid_generations": ev["invalid_generations"]}
    if out:
        write_json(out, doc)
    save_test_evaluation(Path(run), doc, ev, retr_name)
    return doc


def save_test_evaluation(run: Path, doc: dict[str, Any], ev: dict[str, Any], retriever_name: str) -> None:
    """Keep the test evaluation in the run (``test_results.json`` + per-user ranks in ``test_ranks.npz``) for
    ``palr report`` and the model card. Ranks: retriever = full ranking, PALR = end to end (10**9 = not retrieved)."""
    import os
    import tempfile

    from palr.model_card import write_model_card

    write_json(run / "test_results.json", doc)
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".test_ranks.", suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, users=np.asarray(ev["users"], dtype=np.int64), targets=np.asarray(ev["targets"]),
                        palr=np.asarray(ev["ranks"]["PALR (end to end)"]["test"], dtype=np.int64),
                        retriever=np.asarray(ev["ranks"][f"{retriever_name} (retriever)"]["test"], dtype=np.int64))
    os.replace(tmp, run / "test_ranks.npz")
    write_model_card(run)


__all__ = ["PALR", "Recommendation", "evaluate_palr", "evaluate_palr_run"]
