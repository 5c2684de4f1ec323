"""One factory: a run's ``ranking.json`` (plus the caller's options) -> its :class:`palr.rank.protocol.Ranker`.

``ranking.json`` says which ranker a run ranks with, and nothing else decides it:

* ``"ranker": "features"``: the feature trees alone (``ranker_dir``); no LLM.
* otherwise the LLM ranker over the run's (or the given) LLM, ``weight``/``fusion`` fusing the retriever's prior;
* with ``"stacked": {"dir", "chosen": true}`` the stacked ranker (:mod:`palr.rank.stacked`: the LLM's scores as
  features of the trees), under the same conditions as the fused one below;
* and with ``"features": {"dir", "weight"}`` (a fine-tuned run whose trees + LLM beat LLM + retriever on the
  held-out users) the trees + ``weight`` x LLM, unless another LLM replaces the run's own (``--llm``), the ranking
  is generative, or ``features=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palr.core.errors import InputError
from palr.llm.prompts import PromptBuilder
from palr.llm.registry import load_llm
from palr.rank.fusion import FusedRanker
from palr.rank.llm_ranker import LLMRanker, RankingConfig
from palr.rank.protocol import Ranker
from palr.rank.stacked import StackedRanker
from palr.rank.trees import FeatureRanker
from palr.retrieval.candidates import CandidateSources
from palr.runs.safety import inside_run

MODES = ("verbalizer", "generative")


@dataclass
class RankOptions:
    """How a loaded run ranks, beyond its ``ranking.json`` (the command line's and the service's options).

    ``llm``: another LLM spec (zero-shot over a retriever run, or replacing a PALR run's model);
    ``allow_fallback``: an LLM backend failure keeps the fallback order instead of stopping;
    ``mode``/``n_candidates``/``weight``/``profiler``: override the run's; ``profile_cache``: an SQLite cache;
    ``features=False``: a fine-tuned run's LLM ranker without its trees."""

    mode: str | None = None
    device: str = "auto"
    llm: str | None = None
    allow_fallback: bool = False
    profiler: str | None = None
    n_candidates: int | None = None
    weight: float | None = None
    profile_cache: str | Path | None = None
    features: bool = True
    trust_run_llm: bool = False  # use a remote endpoint the run's ranking.json names (never with credentials)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            shown = self.mode if len(self.mode) <= 40 else self.mode[:40] + "..."
            raise InputError(f"unknown ranking mode {shown!r}: choose {' or '.join(MODES)}")


def load_ranking_llm(run: Path, rc: RankingConfig, device: str = "auto", *, user_llm: str | None = None,
                     trust: bool = False) -> tuple[Any, str]:
    """(the LLM the ranking config names, its spec). ``user_llm``: the spec the user named (used as given,
    credentials included); otherwise the run's, vetted by :mod:`palr.llm.trust` (``trust``: a remote endpoint the
    run names may be used, without credentials)."""
    spec, options = (user_llm, {}) if user_llm else rc.llm_spec(run, trust=trust)
    if spec.split(":", 1)[0] in ("hf", "mini") or Path(spec).exists():
        options = {"device": device, **options}
    return load_llm(spec, **options), spec


def build_ranker(run: str | Path, ranking: dict[str, Any], catalog: Any, *, options: RankOptions | None = None,
                 llm: Any = None, retriever: str = "retriever", sources: CandidateSources | None = None) -> Ranker:
    """The ranker ``ranking`` (a run's ``ranking.json``, overrides applied) describes.

    ``llm``: an LLM already loaded (else the one the ranking names is loaded here); ``catalog``: the data set's
    catalogue (prompts); ``retriever``: the retriever's name (labels); ``sources``: the run's merged candidate
    sources (``"candidates"`` in ranking.json), whose scores and ranks the stacked ranker reads."""
    run, opts = Path(run), options or RankOptions()
    if ranking.get("ranker") == "features":  # the feature re-ranker: no LLM, no profiles
        if ranking.get("stacked"):  # over merged candidates: the stacked trees without LLM features
            return StackedRanker.load(inside_run(run, str(ranking["stacked"].get("dir", "")), "stacked.dir"), None,
                                      sources)
        return FeatureRanker.load(inside_run(run, str(ranking.get("ranker_dir", "")), "ranker_dir"))
    rc = RankingConfig.from_dict(ranking)
    if llm is None:
        llm, _ = load_ranking_llm(run, rc, opts.device, user_llm=opts.llm, trust=opts.trust_run_llm)
    builder = PromptBuilder(catalog, rc.style, rc.history_len, evidence=rc.evidence)  # type: ignore[arg-type]
    # a weight from the run was chosen on validation users (zero-shot: chosen later, by the evaluation)
    chosen_on = "" if opts.weight is not None or ranking.get("zero_shot") else "validation users"
    ranker = LLMRanker(llm, builder, mode=opts.mode or rc.mode, weight=rc.weight,  # type: ignore[arg-type]
                       batch_size=64 if rc.style == "tokens" else 8, fusion=rc.fusion,
                       allow_fallback=opts.allow_fallback, retriever=retriever, chosen_on=chosen_on)
    stacked = ranking.get("stacked") or {}
    if stacked.get("chosen") and opts.features and not opts.llm and ranker.mode == "verbalizer":
        return StackedRanker.load(inside_run(run, str(stacked.get("dir", "")), "stacked.dir"), ranker, sources)
    feats = ranking.get("features")
    if feats and opts.features and not opts.llm and ranker.mode == "verbalizer":
        return FusedRanker(ranker, FeatureRanker.load(inside_run(run, str(feats.get("dir", "")), "features.dir")), float(feats["weight"]),
                           chosen_on="held-out users")
    return ranker


def unused_stacked(run: str | Path, ranking: dict[str, Any], ranker: Ranker, sources: CandidateSources | None = None,
                   options: RankOptions | None = None) -> StackedRanker | None:
    """The run's stacked ranker (LLM scores as tree features) when held-out users did not choose it: the evaluation
    still measures it against its twin. None when the run has none, or ranks with it, or another LLM replaces the
    run's own."""
    opts = options or RankOptions()
    stacked = ranking.get("stacked") or {}
    inner = ranker.llm_ranker
    if (not stacked or stacked.get("chosen") or not stacked.get("llm_features") or inner is None or opts.llm
            or not opts.features or inner.mode != "verbalizer"):
        return None
    return StackedRanker.load(Path(run) / stacked["dir"], inner, sources)


__all__ = ["MODES", "RankOptions", "build_ranker", "load_ranking_llm", "unused_stacked"]
