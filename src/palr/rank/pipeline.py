"""A run loaded for use: ``PALR.load(dir).recommend(user=..., history=..., k=10, explain=True)`` gives the profile,
the ranked items with scores and, with ``explain``, one grounded sentence per item. Loading reads the run alone
(its data snapshot, its models through :func:`palr.rank.factory.build_ranker`); the API and the CLI share its
input rules (``MAX_*``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import InputError, PalrError, UnknownUserError
from palr.core.topk import top_k
from palr.data import Split
from palr.data.titles import match_titles
from palr.rank.explain import explain_items, explain_popular
from palr.rank.explain import llm_explanations as written
from palr.rank.factory import RankOptions, build_ranker, unused_stacked
from palr.rank.llm_ranker import RankingConfig
from palr.rank.profiles import AttributeProfiler, HistoryProfiles, ProfileCache, make_profiler
from palr.rank.protocol import Ranker
from palr.retrieval.base import load_retriever
from palr.retrieval.candidates import CandidateSources
from palr.retrieval.load import load_run
from palr.runs.safety import inside_run, read_json
from palr.runs.snapshot import load_run_split
from palr.runs.store import read_run

log = logging.getLogger(__name__)


MAX_USER_ID = 256  # characters of a user id (CLI and HTTP service alike)


MAX_HISTORY = 2000  # item ids in a given history


MAX_ITEM_ID = 128  # characters of an item id


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


def _retriever_name(cfg: dict[str, Any]) -> str:
    r = cfg["config"]["retriever"]
    return str(r["retriever"] if isinstance(r, dict) else r)


def _run_kind(run: Path) -> str:

    read_run(run)  # complete, right format
    return str(json.loads((run / "run.json").read_text()).get("kind"))


class PALR:
    """A loaded run: retriever + profiler + LLM ranker over the data set it was trained on.

    ``PALR.load(PALR_RUN)``: the run's fine-tuned model. ``PALR.load(RETRIEVER_RUN, llm=SPEC)``: any LLM ranks that
    run's candidates zero-shot with PALR's prompts (``llm`` also replaces a PALR run's own model, e.g. the same
    model served over ``openai:``). LLM and profiler are built through their registries from the run's
    :class:`palr.rank.llm_ranker.RankingConfig`.
    """

    def __init__(self, run: Path, config: dict[str, Any], split: Split, retriever: Any, ranker: Ranker,
                 ranking: dict[str, Any], profiles: Any = None, sources: CandidateSources | None = None) -> None:
        self.run, self.config, self.split, self.retriever, self.ranker, self.ranking = run, config, split, retriever, ranker, ranking
        self.sources = sources  # candidates merged from several retrievers (None: the retriever's top-K)
        self.unused_stacked: Any = None  # the run's stacked ranker when held-out users did not choose it
        if profiles is None:

            profiles = HistoryProfiles(split.dataset.name, split.dataset.catalog, AttributeProfiler(),
                                       enabled=bool(ranking.get("profiles", True)))
        self.profiles = profiles

    @classmethod
    def load(cls, run: str | Path, data_dir: str | Path | None = None, options: RankOptions | None = None,
             **overrides: Any) -> PALR:
        """Load a PALR run, or a retriever run with ``llm`` (zero-shot). ``options`` (or its fields as keywords:
        ``llm``, ``mode``, ``allow_fallback``, ...; see :class:`palr.rank.factory.RankOptions`) adjust how it ranks;
        the ranker itself comes from :func:`palr.rank.factory.build_ranker`. ``allow_fallback=False`` (the
        default): an LLM failure stops every call with :class:`palr.core.errors.LLMUnavailable` (or
        :class:`palr.core.errors.LLMRequestFailed`) instead of keeping the fallback order."""

        opts = replace(options, **overrides) if options is not None else RankOptions(**overrides)
        run = Path(run)
        kind = _run_kind(run)
        if kind == "palr":
            cfg = read_run(run, "palr")
            split = load_run_split(run, cfg, data_dir=data_dir)  # the run's snapshot, never the raw files
            raw = read_json(run / "ranking.json")
            retriever = load_retriever(inside_run(run, "retriever", "the retriever directory"))
            sources = (CandidateSources.load(inside_run(run, str(raw["candidates"].get("dir", "")), "candidates.dir"),
                                             retriever)
                       if raw.get("candidates") else None)
        elif kind == "retriever":
            if not opts.llm:
                raise PalrError(f"{run} is a retriever run: give --llm SPEC to rank its candidates with an LLM "
                                "(zero-shot), or use a PALR run (palr finetune)")

            cfg, retriever, split = load_run(run, data_dir)
            sources = None
            raw = {**asdict(RankingConfig(style="text", n_candidates=20)), "zero_shot": True}
        else:
            raise PalrError(f"{run} is a {kind!r} run; recommend/evaluate/serve need a PALR or retriever run")
        if opts.llm:
            raw["llm"] = opts.llm
        if opts.n_candidates:
            raw["n_candidates"] = int(opts.n_candidates)
        if opts.weight is not None:
            raw["weight"] = float(opts.weight)
        if opts.profiler:
            raw["profiler"] = opts.profiler
        rc = RankingConfig.from_dict(raw)  # checked, and a profiler LLM the run names vetted before anything loads
        pspec, popts = (rc.profiler, {}) if opts.profiler else rc.profiler_spec(run, trust=opts.trust_run_llm)
        ranker = build_ranker(run, raw, split.dataset.catalog, options=opts, retriever=_retriever_name(cfg),
                              sources=sources)
        raw["ranked_by"] = ranker.label
        if ranker.llm_ranker is None:  # the feature trees alone: no LLM, no LLM profiles
            return cls(run, cfg, split, retriever, ranker, raw, sources=sources)
        model = ranker.llm_ranker.llm
        profile_cache = opts.profile_cache
        if profile_cache is None and kind == "palr" and (run / "profiles.sqlite").is_file():
            profile_cache = run / "profiles.sqlite"  # the very profiles fine-tuning read
        cache = ProfileCache(profile_cache) if profile_cache else None
        prof = make_profiler(spec=pspec, ranking_llm=model, allow_fallback=opts.allow_fallback, **popts)
        profiles = HistoryProfiles(split.dataset.name, split.dataset.catalog, prof, cache, enabled=rc.profiles,
                                   user_attributes=split.dataset.user_attributes if raw.get("user_attributes")
                                   else None)
        raw["llm_name"] = getattr(model, "name", None) or opts.llm or rc.llm or rc.base_model
        palr = cls(run, cfg, split, retriever, ranker, raw, profiles, sources=sources)
        palr.unused_stacked = unused_stacked(run, raw, ranker, sources, opts)
        return palr

    # -------------------------------------------------------------------- helpers
    @property
    def catalog(self) -> Any:
        return self.split.dataset.catalog

    @property
    def retriever_name(self) -> str:
        return _retriever_name(self.config)

    def profile_text(self, history: Sequence[int], user: int | None = None) -> str | None:
        """The profile the ranker reads; ``user`` (a data set row) adds the user's attributes where the run does."""
        if user is not None:
            return self.profiles(history, user)
        return self.profiles(history)

    def candidates(self, histories: Sequence[np.ndarray], users: np.ndarray | None = None,
                   k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The candidate lists the ranker reorders: merged from the run's sources, or the retriever's top-K."""
        k = self.ranking["n_candidates"] if k is None else k
        if self.sources is not None and k == self.sources.size:
            cands, scores, _ = self.sources.merge(histories, users)
            return cands, scores
        return top_k(self.retriever.score(list(histories)), histories, k, users=users)

    def llm_counts(self) -> dict[str, Any]:
        """What ranks (``ranker``: the ranker's label) and the LLM's failures and fallbacks so far (ranking and
        profiles), for results and responses."""
        inner = self.ranker.llm_ranker
        llm = inner.llm if inner is not None else None
        return {"name": self.ranking.get("llm_name", getattr(llm, "name", "")), "ranker": self.ranker.label,
                "ranking_fallback_users": int(self.ranker.failed_users),
                "request_failures": int(getattr(llm, "failures", 0)),
                "profiler": self.profiles.name, "llm_profiles": self.profiles.llm_profiles,
                "profile_fallbacks": self.profiles.fallbacks,
                "scoring": getattr(llm, "last_scoring", "logprobs") if llm is not None else None}

    def resolve_history(self, user: str | None, history: Sequence[str] | None,
                        history_titles: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], list[Any]]:
        """Dense item indices of a known user's whole history, of the given item ids, or of the catalogue items
        the given titles match (unknown ids and repeats dropped, with a note; every title's match reported);
        refuses both a user and a history, or neither, an over-long user id or history."""
        notes: list[str] = []
        matches: list[Any] = []
        if history_titles is not None:

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
            return Recommendation(user, "no history", items, notes, {**self.llm_counts(), "ranked_by": "popularity",
                                                                      "consulted": ["popularity"]}, match_docs)
        left = self.split.n_items - len(np.unique(hist))
        if left < self.ranking["n_candidates"]:
            notes.append(f"the history covers {self.split.n_items - left:,} of the {self.split.n_items:,} items: "
                         f"{left:,} unseen item(s) left to rank")
        if left == 0:
            return Recommendation(user, self.profile_text(hist) or "", [], notes,
                                  {**self.llm_counts(), "ranked_by": "nothing to rank", "consulted": []}, match_docs)
        u = np.array([self.split.dataset.user_index(user)]) if user is not None and history is None else None
        cands, cscores = self.candidates([hist], u if self.sources is not None else None,
                                         min(self.ranking["n_candidates"], left))
        profile = self.profile_text(hist, None if u is None else int(u[0]))
        res = self.ranker.rank([hist], [profile], cands, cscores, users=u)
        if res.failed[0]:
            notes.append(f"the LLM failed for this user: ranked by {res.ranked_by(0)}")
        notes += res.notes
        retr_rank = {int(c): r + 1 for r, c in enumerate(cands[0])}
        items = [self._item(int(i), float(s), retr_rank[int(i)]) for i, s in zip(res.order[0][:k], res.scores[0][:k])]
        if explain:
            idx = [self.catalog.index_of(x["item"]) for x in items]
            expl = explain_items(self.catalog, hist, idx, getattr(self.retriever, "item_vectors", None))
            sources = ["template"] * len(expl)
            inner = self.ranker.llm_ranker
            if llm_explanations:
                if inner is None:
                    notes.append("LLM explanations need an LLM (this run ranks without one): templates")
                elif inner.builder.style != "text":
                    notes.append("LLM explanations need a text LLM (this run's model reads item tokens): templates")
                else:

                    expl, sources = (list(x) for x in zip(*written(inner.llm, self.catalog, idx, expl)))
            for it, e, src in zip(items, expl, sources):
                d = e.to_dict(self.catalog)
                it.update(explanation=d["text"], because=d["because"], explanation_source=src)
        return Recommendation(user, profile or "", items, notes, {**self.llm_counts(), "ranked_by": res.ranked_by(0),
                                                                  "consulted": res.consulted(0)}, match_docs)

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


__all__ = ["PALR", "Recommendation"]
