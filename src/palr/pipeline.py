"""The PALR pipeline: load a run; recommend for a user or a history; evaluate end to end.

``PALR.load(dir).recommend(user=..., history=..., k=10, explain=True)`` gives the profile, the ranked
items with scores and, with ``explain``, one grounded sentence per item.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr.data import Split, load_split
from palr.errors import InputError, PalrError, UnknownUserError
from palr.evaluation import DEFAULT_KS, evaluate_retriever, metrics_from_ranks, top_k
from palr.evaluation.report import compare_ranks, statistics_protocol, write_per_user
from palr.ranking import PromptBuilder, Ranker, RankingConfig, positional_ranks
from palr.retrieval.base import load_retriever
from palr.runs import check_dataset, dataset_info, read_run, run_data_spec, write_json

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
    items: list[dict[str, Any]]  # {"item", "title", "score", "retriever_rank", "explanation"?, "because"?}
    notes: list[str] = field(default_factory=list)
    llm: dict[str, Any] = field(default_factory=dict)  # name, ranked_by, failures, fallbacks, scoring
    matches: list[dict[str, Any]] = field(default_factory=list)  # --history-titles: what each title matched

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "profile": self.profile, "items": self.items, "notes": self.notes,
                "llm": self.llm, "matches": self.matches}


def _run_kind(run: Path) -> str:
    import json

    read_run(run)  # complete, right format
    return str(json.loads((run / "run.json").read_text()).get("kind"))


class PALR:
    """A loaded run: retriever + profiler + LLM ranker over the data set it was trained on.

    ``PALR.load(PALR_RUN)``: the run's fine-tuned model. ``PALR.load(RETRIEVER_RUN, llm=SPEC)``: any LLM ranks that
    run's candidates zero-shot with PALR's prompts (``llm`` also replaces a PALR run's own model, e.g. the same
    model served over ``openai:``). LLM and profiler are built through their registries from the run's
    :class:`palr.ranking.RankingConfig`.
    """

    def __init__(self, run: Path, config: dict[str, Any], split: Split, retriever: Any, ranker: Any,
                 ranking: dict[str, Any], profiles: Any = None) -> None:
        self.run, self.config, self.split, self.retriever, self.ranker, self.ranking = run, config, split, retriever, ranker, ranking
        if profiles is None:
            from palr.profiles import AttributeProfiler, HistoryProfiles

            profiles = HistoryProfiles(split.dataset.name, split.dataset.catalog, AttributeProfiler(),
                                       enabled=bool(ranking.get("profiles", True)))
        self.profiles = profiles

    @classmethod
    def load(cls, run: str | Path, data_dir: str | Path | None = None, mode: str | None = None,
             device: str = "auto", *, llm: str | None = None, allow_fallback: bool = True,
             profiler: str | None = None, n_candidates: int | None = None, weight: float | None = None,
             profile_cache: str | Path | None = None, features: bool = True) -> PALR:
        """Load a PALR run, or a retriever run with ``llm`` (zero-shot). ``allow_fallback=False``: an unreachable
        LLM stops every call with :class:`palr.errors.LLMUnavailable` instead of keeping the retriever's order."""
        from palr.llm.base import load_llm
        from palr.profiles import HistoryProfiles, ProfileCache, make_profiler

        if mode is not None and mode not in MODES:
            raise InputError(f"unknown ranking mode {short(mode)!r}: choose {' or '.join(MODES)}")
        run = Path(run)
        kind = _run_kind(run)
        if kind == "palr":
            cfg = read_run(run, "palr")
            split = load_split(run_data_spec(cfg, data_dir))
            check_dataset(cfg, split.dataset, run)
            raw = json.loads((run / "ranking.json").read_text())
            rc = RankingConfig.from_dict(raw)
            retriever = load_retriever(run / "retriever")
            if raw.get("ranker") == "features":  # the feature re-ranker: no LLM, no profiles
                from palr.feature_ranker import FeatureRanker

                return cls(run, cfg, split, retriever, FeatureRanker.load(run / raw["ranker_dir"]), raw)
            if llm:
                raw = {**raw, "llm": llm}
        elif kind == "retriever":
            if not llm:
                raise PalrError(f"{run} is a retriever run: give --llm SPEC to rank its candidates with an LLM "
                                "(zero-shot), or use a PALR run (palr finetune)")
            from palr.retrieval.train import load_run

            cfg, retriever, split = load_run(run, data_dir)
            rc = RankingConfig(style="text", n_candidates=20, llm=llm)
            raw = {**asdict(rc), "zero_shot": True}
        else:
            raise PalrError(f"{run} is a {kind!r} run; recommend/evaluate/serve need a PALR or retriever run")
        if n_candidates:
            raw["n_candidates"] = rc.n_candidates = int(n_candidates)
        if weight is not None:
            raw["weight"] = rc.weight = float(weight)
        if profiler:
            raw["profiler"] = rc.profiler = profiler
        spec, options = (llm, {}) if llm else rc.llm_spec(run)
        if spec.split(":", 1)[0] in ("hf", "mini") or Path(spec).exists():
            options = {"device": device, **options}
        model = load_llm(spec, **options)
        builder = PromptBuilder(split.dataset.catalog, rc.style, rc.history_len)  # type: ignore[arg-type]
        ranker: Any = Ranker(model, builder, mode=mode or rc.mode, weight=rc.weight,  # type: ignore[arg-type]
                             batch_size=64 if rc.style == "tokens" else 8, fusion=rc.fusion,
                             allow_fallback=allow_fallback)
        if raw.get("features") and features and not llm and ranker.mode == "verbalizer":
            from palr.feature_ranker import FeatureRanker
            from palr.fusion import (
                FusedRanker,  # the PALR ranker: LLM + feature ranker (``features=False``: LLM)
            )

            ranker = FusedRanker(ranker, FeatureRanker.load(run / raw["features"]["dir"]), float(raw["features"]["weight"]))
        if profile_cache is None and kind == "palr" and (run / "profiles.sqlite").is_file():
            profile_cache = run / "profiles.sqlite"  # the very profiles fine-tuning read
        cache = ProfileCache(profile_cache) if profile_cache else None
        prof = make_profiler(spec=rc.profiler, ranking_llm=model, allow_fallback=allow_fallback)
        profiles = HistoryProfiles(split.dataset.name, split.dataset.catalog, prof, cache, enabled=rc.profiles)
        raw["llm_name"] = getattr(model, "name", spec)
        return cls(run, cfg, split, retriever, ranker, raw, profiles)

    # -------------------------------------------------------------------- helpers
    @property
    def catalog(self) -> Any:
        return self.split.dataset.catalog

    @property
    def retriever_name(self) -> str:
        r = self.config["config"]["retriever"]
        return str(r["retriever"] if isinstance(r, dict) else r)

    def profile_text(self, history: Sequence[int]) -> str | None:
        return self.profiles(history)

    def candidates(self, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.retriever.score(list(histories)), histories, self.ranking["n_candidates"])

    def llm_counts(self) -> dict[str, Any]:
        """LLM failures and fallbacks so far (ranking and profiles), for results and responses."""
        llm = self.ranker.llm
        return {"name": self.ranking.get("llm_name", getattr(llm, "name", "")),
                "ranking_fallback_users": int(self.ranker.failed_users),
                "request_failures": int(getattr(llm, "failures", 0)),
                "profiler": self.profiles.name, "llm_profiles": self.profiles.llm_profiles,
                "profile_fallbacks": self.profiles.fallbacks,
                "scoring": getattr(llm, "last_scoring", "logprobs")}

    def resolve_history(self, user: str | None, history: Sequence[str] | None,
                        history_titles: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], list[Any]]:
        """Dense item indices of a known user's whole history, of the given item ids, or of the catalogue items
        the given titles match (unknown ids and repeats dropped, with a note; every title's match reported);
        refuses both a user and a history, or neither, an over-long user id or history."""
        notes: list[str] = []
        matches: list[Any] = []
        if history_titles is not None:
            from palr.titles import match_titles

            if len(history_titles) > MAX_HISTORY:
                raise InputError(f"a history holds at most {MAX_HISTORY:,} titles, got {len(history_titles):,}")
            matches = match_titles(self.catalog, [short(t, 200) for t in history_titles])
            missed = [short(m.query, 40) for m in matches if m.item is None]
            if missed:
                notes.append(f"titles not found in the catalogue (ignored): {' | '.join(missed[:10])}")
            history = list(history or []) + [m.item for m in matches if m.item is not None]
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
            return np.asarray(known, dtype=np.int64), notes, matches
        assert user is not None
        if len(user) > MAX_USER_ID:
            raise InputError(f"a user id has at most {MAX_USER_ID} characters, got {len(user):,}")
        try:
            u = self.split.dataset.user_index(user)
        except KeyError:
            raise UnknownUserError(f"unknown user {short(user, 40)!r} in {self.split.dataset.name}; give a history "
                                   "of item ids (or titles) to recommend for a new user") from None
        return self.split.dataset.sequences[u], notes, matches  # everything the user did

    @property
    def max_k(self) -> int:
        """The most items one recommendation can hold: the candidate count (capped by the catalogue)."""
        return int(min(self.ranking["n_candidates"], self.split.n_items))

    # -------------------------------------------------------------------- recommend
    def recommend(self, user: str | None = None, history: Sequence[str] | None = None, k: int = 10,
                  explain: bool = False, history_titles: Sequence[str] | None = None,
                  llm_explanations: bool = False) -> Recommendation:
        """Top-k items for a known user (their whole history), a given history of item ids, or of titles.

        ``k`` runs from 1 to :attr:`max_k`; a history that leaves fewer than ``k`` unseen items gives fewer, with a
        note. Invalid input raises :class:`InputError`, an unknown user :class:`UnknownUserError`."""
        if not 1 <= k <= self.max_k:
            raise InputError(f"k must be between 1 and {self.max_k} (the candidate count), got {k}")
        from palr.explain import explain_items, explain_popular

        hist, notes, matches = self.resolve_history(user, history, history_titles)
        match_docs = [m.to_dict() for m in matches]
        if len(hist) == 0:
            notes.append("empty or unknown history: falling back to popularity (not ranked by the LLM)")
            counts = self.popularity
            order = np.lexsort((np.arange(len(counts)), -counts))[:k]
            items = []
            for i in order:
                it = {"item": self.catalog.item_ids[i], "title": self.catalog.titles[i], "score": None,
                      "popularity": int(counts[i]), "retriever_rank": None, "ranked_by": "popularity"}
                if explain:
                    it.update(explanation=explain_popular(int(counts[i]), len(self.split.train)).text, because=[])
                items.append(it)
            return Recommendation(user, "no history", items, notes, {**self.llm_counts(), "ranked_by": "popularity"},
                                  match_docs)
        left = self.split.n_items - len(np.unique(hist))
        if left < self.ranking["n_candidates"]:
            notes.append(f"the history covers {self.split.n_items - left:,} of the {self.split.n_items:,} items: "
                         f"{left:,} unseen item(s) left to rank")
        if left == 0:
            return Recommendation(user, self.profile_text(hist) or "", [], notes, self.llm_counts(), match_docs)
        cands, cscores = top_k(self.retriever.score([hist]), [hist], min(self.ranking["n_candidates"], left))
        profile = self.profile_text(hist)
        u = np.array([self.split.dataset.user_index(user)]) if user is not None and history is None else None
        res = self.ranker.rank([hist], [profile], cands, cscores, users=u)
        if res.failed[0]:
            notes.append("the LLM failed for this user: the retriever's order stands")
        notes += res.notes
        ranked_by = "retriever (LLM failed)" if res.failed[0] else "llm"
        retr_rank = {int(c): r + 1 for r, c in enumerate(cands[0])}
        items = [self._item(int(i), float(s), retr_rank[int(i)]) for i, s in zip(res.order[0][:k], res.scores[0][:k])]
        if explain:
            idx = [self.catalog.index_of(x["item"]) for x in items]
            expl = explain_items(self.catalog, hist, idx, getattr(self.retriever, "item_vectors", None))
            sources = ["template"] * len(expl)
            if llm_explanations:
                if self.ranker.builder.style != "text":
                    notes.append("LLM explanations need a text LLM (this run's model reads item tokens): templates")
                else:
                    from palr.explain import llm_explanations as written

                    expl, sources = (list(x) for x in zip(*written(self.ranker.llm, self.catalog, idx, expl)))
            for it, e, src in zip(items, expl, sources):
                d = e.to_dict(self.catalog)
                it.update(explanation=d["text"], because=d["because"], explanation_source=src)
        return Recommendation(user, profile or "", items, notes, {**self.llm_counts(), "ranked_by": ranked_by},
                              match_docs)

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
def _rank_all(palr: PALR, hist: list[np.ndarray], profiles: list[str | None], cands: np.ndarray,
              cscores: np.ndarray, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(llm log-probs (U, K) in retriever order, failed (U,), invalid generations, seconds) over all users."""
    from tqdm.auto import tqdm

    bs = palr.ranker.batch_size
    lps, failed, invalid = [], [], 0
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(hist), bs), desc=desc, disable=not progress, leave=False):
        r = palr.ranker.rank(hist[s:s + bs], profiles[s:s + bs], cands[s:s + bs], cscores[s:s + bs], weight=0.0)
        if palr.ranker.mode == "generative":  # positions of the generated order, as pseudo log-probs
            pos = np.argsort(np.argsort([[list(o).index(c) for c in row] for o, row in zip(r.order, cands[s:s + bs])]))
            lps.append(-pos.astype(np.float32))
        else:
            lps.append(r.llm_logprobs)
        failed.append(r.failed)
        invalid += r.invalid_generations
    return np.concatenate(lps), np.concatenate(failed), invalid, time.perf_counter() - t0


def _own_scores(palr: PALR, hist: list[np.ndarray], profiles: list[str | None], cands: np.ndarray,
                cscores: np.ndarray, users: np.ndarray, progress: bool, desc: str,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fused scores, LLM log-probs, failed), candidates in retriever order, from a ranker that fuses itself."""
    from tqdm.auto import tqdm

    bs = palr.ranker.batch_size
    parts = [palr.ranker.score_candidates(hist[s:s + bs], profiles[s:s + bs], cands[s:s + bs], cscores[s:s + bs],
                                          users=users[s:s + bs])
             for s in tqdm(range(0, len(hist), bs), desc=desc, disable=not progress, leave=False)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _fused_ranks(lp: np.ndarray, failed: np.ndarray, cands: np.ndarray, cscores: np.ndarray, targets: np.ndarray,
                 weight: float, fusion: str) -> np.ndarray:
    from palr.ranking import floor_missing, fuse, retriever_prior

    fused = fuse(floor_missing(lp), weight, cscores, fusion)
    fused[failed] = retriever_prior(cands.shape, cscores, fusion)[failed]
    return positional_ranks(fused, cands, targets)


def choose_zero_shot_weight(palr: PALR, n_users: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fusion kind and weight for a zero-shot LLM, chosen on ``n_users`` seeded **validation** users."""
    from palr.ranking import choose_weight

    split = palr.split
    rng = np.random.default_rng(seed + 11)
    users = np.sort(rng.choice(len(split.train), size=min(n_users, len(split.train)), replace=False))
    hist = [split.train[u] for u in users]
    cands, cscores = palr.candidates(hist)
    lp, failed, _, secs = _rank_all(palr, hist, palr.profiles.texts(hist), cands, cscores, progress,
                                    "LLM ranking (valid)")
    from palr.ranking import floor_missing

    lp = floor_missing(lp)
    lp[failed] = 0.0  # a failed user: the LLM adds nothing, the prior decides
    kind, w, table = choose_weight(lp, cands, split.valid_targets[users], scores=cscores)
    return {"fusion": kind, "weight": w, "table": {k: round(v, 5) for k, v in table.items()},
            "valid_users": len(users), "valid_failures": int(failed.sum()), "seconds": round(secs, 1)}


def evaluate_palr(palr: PALR, stage: str = "test", ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
                  latency_users: int = 100, users: np.ndarray | None = None) -> dict[str, Any] | None:
    """Retriever alone (full ranking), PALR end to end (a retrieval miss counts as a miss; the run's fusion
    weight), the LLM alone (weight 0), PALR on the users whose target was retrieved, the ranking time per user
    and the LLM's failures. ``users``: a subset (all by default); the retriever's figures are then on the same
    subset.

    Under a launcher with several processes (``torchrun``, ``accelerate launch``) each process ranks a block of
    whole batches of users and the main process gathers the per-user results: the figures are those of one
    process. The main process gets the result, the others None."""
    from palr import distributed
    from palr.console import progress_enabled
    from palr.ranking import floor_missing, fuse, order_by, retriever_prior

    split = palr.split
    everyone = np.arange(split.dataset.n_users) if users is None else np.asarray(users)
    bs = palr.ranker.batch_size
    retr_bs = 512
    # whole batches of both the retriever and the LLM: every batch holds the users it holds in one process
    sel = everyone[distributed.shard(len(everyone), math.lcm(retr_bs, bs))]
    show = progress_enabled(progress) and distributed.is_main()
    retr = evaluate_retriever(palr.retriever, split, stage, ks, candidates=palr.ranking["n_candidates"],  # type: ignore[arg-type]
                              predictions=max(max(ks), 10), batch_size=retr_bs, users=sel)
    assert retr is not None
    all_hist = split.histories(stage)  # type: ignore[arg-type]
    hist = [all_hist[u] for u in sel]
    targets = split.targets(stage)[sel]  # type: ignore[arg-type]
    cands = retr["candidates"]
    cscores = retr["candidate_scores"]
    t0 = time.perf_counter()
    profiles = palr.profiles.texts(hist)
    prof_s = time.perf_counter() - t0
    K = cands.shape[1]
    own = hasattr(palr.ranker, "score_candidates")  # the feature ranker and the fused PALR ranker fuse themselves
    if own and len(hist):
        fused, lp, failed_mask = _own_scores(palr, hist, profiles, cands, cscores, sel, show, f"ranking ({stage})")
        invalid = 0
    elif len(hist):
        lp, failed_mask, invalid, _ = _rank_all(palr, hist, profiles, cands, cscores, show, f"PALR ranking ({stage})")
    else:
        lp, failed_mask, invalid = np.empty((0, K), np.float32), np.zeros(0, dtype=bool), 0
        fused = np.empty((0, K))
    w, fusion = float(palr.ranker.weight), palr.ranker.fusion
    if not own:
        fused = fuse(floor_missing(lp), w, cscores, fusion)
        fused[failed_mask] = retriever_prior(cands.shape, cscores, fusion)[failed_mask]
    order, _ = order_by(fused, cands)
    ranks_part = positional_ranks(fused, cands, targets)
    # the LLM was not consulted (the feature ranker, or a fused ranker whose LLM weight is 0): no "LLM alone" row,
    # which would otherwise be the retriever's order relabelled
    no_llm = own and (float(palr.ranker.weight) == 0.0 or not np.isfinite(lp).any())
    part = {"order": order, "ranks": ranks_part,
            "llm_ranks": ranks_part if no_llm else
            _fused_ranks(lp, failed_mask, cands, cscores, targets, 0.0, "rank" if own else fusion),
            "hit": np.array([t in row for row, t in zip(cands, targets)], dtype=bool),
            "retr_ranks": retr["ranks"], "retr_predictions": retr["predictions"], "targets": targets,
            "failed": failed_mask, "invalid": invalid}
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
        palr.ranker.rank([hist[u]], [profiles[u]], cands[u:u + 1], cscores[u:u + 1], users=sel[u:u + 1])
        lat.append(time.perf_counter() - t1)
    retr_name = palr.retriever_name
    llm_ranks = g["llm_ranks"]
    results = {
        f"{retr_name} (retriever)": {stage: {**metrics_from_ranks(g["retr_ranks"], ks), f"Recall@{K}": float(hit.mean())}},
        "PALR (end to end)": {stage: {**metrics_from_ranks(ranks, ks), f"Recall@{K}": float(hit.mean())}},
        "LLM alone (end to end)": {stage: {**metrics_from_ranks(llm_ranks, ks), f"Recall@{K}": float(hit.mean())}},
        "PALR (target retrieved)": {stage: metrics_from_ranks(ranks[hit], ks)},
        f"{retr_name} (target retrieved)": {stage: metrics_from_ranks(g["retr_ranks"][hit], ks)},
    }
    timings = {"ranking_s": round(rank_s, 3), "ranking_ms_per_user_batched": round(1000 * rank_s / len(ranks), 3),
               "profiles_s": round(prof_s, 3), "latency_users": len(lat),
               "retriever_eval_s": round(retr["seconds"], 3), "processes": distributed.world_size()}
    if lat:
        timings["ranking_ms_per_user_median"] = round(1000 * statistics.median(lat), 3)
    retr_ranks = g["retr_ranks"]
    per_user_ranks = {f"{retr_name} (retriever)": {stage: retr_ranks}, "PALR (end to end)": {stage: ranks},
                      "LLM alone (end to end)": {stage: llm_ranks},
                      "PALR (target retrieved)": {stage: ranks[hit]},
                      f"{retr_name} (target retrieved)": {stage: retr_ranks[hit]}}
    pairs = [("PALR (end to end)", f"{retr_name} (retriever)"),
             ("LLM alone (end to end)", f"{retr_name} (retriever)"),
             ("PALR (target retrieved)", f"{retr_name} (target retrieved)")]
    if no_llm:
        for d in (results, per_user_ranks):
            d.pop("LLM alone (end to end)")
        pairs = [p for p in pairs if p[0] != "LLM alone (end to end)"]
    pairs = [(a, b) for a, b in pairs if len(per_user_ranks[a][stage])]  # no target retrieved: nothing to pair
    return {"results": results, "timings": timings, "order": g["order"], "retriever_predictions": g["retr_predictions"],
            "users": everyone, "targets": g["targets"], "ranks": per_user_ranks,
            "comparisons": compare_ranks(per_user_ranks, pairs, ks), "llm_failures": int(g["failed"].sum()),
            "invalid_generations": g["invalid"]}


def evaluate_palr_run(run: str | Path, out: str | Path | None = None, predictions: str | Path | None = None,
                      retriever_predictions: str | Path | None = None, data_dir: str | Path | None = None,
                      mode: str | None = None, progress: bool = True,
                      per_user: str | Path | None = None, *, llm: str | None = None,
                      allow_fallback: bool = True, n_users: int = 0, seed: int = 0, n_candidates: int | None = None,
                      valid_users: int | None = None, profiler: str | None = None,
                      latency_users: int = 100, weight: float | None = None,
                      fusion: str | None = None) -> dict[str, Any] | None:
    """`palr evaluate --run RUN [--llm SPEC]`: the test split, retriever and PALR measured in one run; PALR (and
    the LLM alone) compared with its retriever on the same users (paired-bootstrap 95% CIs of the difference and
    ratio, p-value).

    A retriever run with ``llm`` is ranked zero-shot; its fusion weight is chosen on ``valid_users`` seeded
    validation users (default: as many as test users), never on test. ``n_users``: a seeded subset of test users
    (0 = all). ``weight``/``fusion``: a fusion chosen elsewhere (on validation users), instead of choosing it here.

    Under a launcher with several processes the users are sharded (:func:`evaluate_palr`); the main process writes
    the files and returns the document, the others return None."""
    from palr import distributed
    from palr.retrieval.train import write_predictions

    distributed.init()  # before the model loads: each process takes its own GPU
    palr = PALR.load(run, data_dir, mode=mode, llm=llm, allow_fallback=allow_fallback, n_candidates=n_candidates,
                     profiler=profiler, weight=weight)
    if fusion is not None:
        palr.ranker.fusion = palr.ranking["fusion"] = fusion
    split = palr.split
    users = None
    if n_users and n_users < split.dataset.n_users:
        users = np.sort(np.random.default_rng(seed).choice(split.dataset.n_users, size=n_users, replace=False))
    selection = None
    if palr.ranking.get("zero_shot") and weight is None:
        nv = valid_users if valid_users is not None else (n_users or split.dataset.n_users)
        if nv > 0:
            selection = choose_zero_shot_weight(palr, nv, seed, progress)
            palr.ranker.weight, palr.ranker.fusion = selection["weight"], selection["fusion"]
            palr.ranking.update(weight=selection["weight"], fusion=selection["fusion"])
    ev = evaluate_palr(palr, "test", progress=progress, users=users, latency_users=latency_users)
    if ev is None:
        return None
    if predictions:
        write_predictions(predictions, split.dataset, ev["order"], users=ev["users"])
    if retriever_predictions:
        write_predictions(retriever_predictions, split.dataset, ev["retriever_predictions"], users=ev["users"])
    retr_name = palr.retriever_name
    if per_user:
        write_per_user(per_user, split.dataset, ev["users"], ev["targets"],
                       {m: ev["ranks"][m]["test"] for m in ("PALR (end to end)", f"{retr_name} (retriever)")})
    n = len(ev["users"])
    counts = palr.llm_counts()
    doc = {"protocol": {**split.dataset.protocol, "ks": list(DEFAULT_KS),
                        "candidates": palr.ranking["n_candidates"],
                        "end_to_end": "a target the retriever did not return counts as a miss",
                        "fusion_weight": palr.ranker.weight, "fusion": palr.ranker.fusion,
                        "fusion_weight_chosen_on": "validation users",
                        "ranking_mode": palr.ranker.mode, "prompt_style": palr.ranking["style"],
                        "llm": counts["name"], "zero_shot": bool(palr.ranking.get("zero_shot")),
                        "profiler": counts["profiler"], "test_users": n,
                        "test_users_seed": seed if users is not None else None},
           "dataset": dataset_info(split.dataset), "results": ev["results"],
           "comparisons": ev["comparisons"], "statistics": statistics_protocol(), "timings": ev["timings"],
           "llm_failures": ev["llm_failures"], "llm_failure_share": round(ev["llm_failures"] / max(n, 1), 4),
           "invalid_generations": ev["invalid_generations"], "llm": counts}
    if selection is not None:
        doc["fusion_selection"] = selection
    if out:
        write_json(out, doc)
    if not palr.ranking.get("zero_shot") and not llm and users is None:  # the run's own model on every test user
        save_test_evaluation(Path(run), doc, ev, retr_name)
    doc["ranks"] = ev["ranks"]  # per test user (not written; --per-user writes them)
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
    os.chmod(tmp, 0o644)
    os.replace(tmp, run / "test_ranks.npz")
    write_model_card(run)


__all__ = ["PALR", "Recommendation", "evaluate_palr", "evaluate_palr_run"]
