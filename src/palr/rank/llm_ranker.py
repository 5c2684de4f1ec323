"""PALR step 3: rank the retriever's candidates with an LLM.

Two modes:

* ``verbalizer`` (default, LlamaRec-style): one forward pass per user; the next-token log-probabilities
  of the candidates' labels give a full order of the candidates, with no generation and no hallucinated
  items. The embedded model labels each candidate with its own item token (``<iN>``); other models get
  single-token labels (" A", " B", ...).
* ``generative`` (the paper's): the model writes item names; decoding is constrained to the candidates
  by a prefix trie, so every answer is a real candidate. Candidates it does not name follow in the
  retriever's order.

The LLM's scores may be fused with the retriever's: ``score = log_softmax(llm) + w * prior``, where the prior
is ``-log(retriever_rank)`` (``fusion="rank"``, any retriever) or ``log_softmax(retriever_scores)`` over the
candidates (``fusion="score"``); the kind and ``w`` are chosen on validation users (never test);
``w = inf`` is the retriever alone (the LLM is not asked). If the LLM gives no usable scores for a user, or its
backend fails (:class:`LLMUnavailable`, :class:`LLMRequestFailed`) and ``allow_fallback`` is on, the retriever's
order stands and the result says so; any other exception is a bug and propagates.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from palr.core.errors import LLMRequestFailed, LLMUnavailable, PalrError, RunError
from palr.core.io import write_json
from palr.core.metrics import ndcg
from palr.llm.mini import item_token_ids
from palr.llm.prompts import (  # PromptBuilder re-exported: prompts.py owns both styles
    PromptBuilder,
    item_token,
)
from palr.llm.protocol import candidate_labels, single_token_labels
from palr.llm.trust import run_llm_spec, run_model_spec
from palr.rank.protocol import LLM, RankResult, label, note_failed_rows, unused_reason
from palr.rank.trie import CandidateTrie
from palr.runs.safety import read_json

log = logging.getLogger(__name__)

Mode = Literal["verbalizer", "generative"]
Style = Literal["tokens", "text"]
FUSION_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)


# ---------------------------------------------------------------------------- a run's ranking settings
@dataclass
class RankingConfig:
    """How a run ranks (``ranking.json`` of a PALR run; built from flags for zero-shot ranking of a retriever run).

    ``profiler``: "attributes", "llm" (the ranking LLM writes the profiles) or "llm:SPEC".
    ``llm``: the LLM spec for :func:`palr.llm.base.load_llm`; empty for fine-tuned runs, whose model is found from
    ``base_model``/``llm_dir``/``lora`` inside the run directory.
    """

    mode: str = "verbalizer"
    style: str = "text"
    weight: float = 0.0
    fusion: str = "rank"
    n_candidates: int = 50
    history_len: int = 20
    evidence: str = "none"  # "rank": token prompts show each candidate's retriever-rank bucket
    profiles: bool = True
    profiler: str = "attributes"
    llm: str = ""
    base_model: str = ""
    llm_dir: str = ""
    lora: bool = False
    ranker: str = "llm"  # "llm", or "features" (the feature re-ranker alone, in ``ranker_dir``)
    ranker_dir: str = ""
    features: dict[str, Any] | None = None  # the feature ranker fused with the LLM: {"dir": ..., "weight": ...}
    stacked: dict[str, Any] | None = None  # the stacked ranker: {"dir": ..., "chosen": ..., "llm_features": ...}
    user_attributes: bool = False  # user attributes (age, occupation, ...) in the profiles
    candidates: dict[str, Any] | None = None  # merged candidate sources: {"dir": ..., "counts": ...}

    def write(self, run: str | Path) -> dict[str, Any]:
        """Write ``RUN/ranking.json`` (its one writer); returns what was written."""
        doc = asdict(self)
        write_json(Path(run) / "ranking.json", doc)
        return doc

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankingConfig:
        """Known keys only (a ranking.json may carry more, e.g. selection tables)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        for k, v in values.items():  # a run file is data: its values are checked, not trusted
            want = type(cls.__dataclass_fields__[k].default)
            if want not in (bool, int, float, str):
                continue
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool)) or (
                want is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise RunError(f"ranking.json: {k} must be {want.__name__}, not {type(v).__name__} ({str(v)[:40]!r})")
        if not all(isinstance(d.get(k) or {}, dict) for k in ("features", "stacked", "candidates")) or not isinstance(
                d.get("ranker_dir", ""), str):
            raise RunError("ranking.json: damaged 'features', 'stacked', 'candidates' or 'ranker_dir' entry")
        return cls(**values)

    @classmethod
    def read(cls, run: str | Path) -> RankingConfig:
        path = Path(run) / "ranking.json"
        if not path.is_file():

            raise RunError(f"{path} is missing: {run} is not a complete PALR run")
        return cls.from_dict(read_json(path))

    def llm_spec(self, run: str | Path, trust: bool = False) -> tuple[str, dict[str, Any]]:
        """(spec, options) for :func:`palr.llm.base.load_llm`. Fine-tuned models read raw prompts (no chat
        template: they were trained on them). The run's files are data (:mod:`palr.llm.trust`): its model lies
        inside it, a hub id is never downloaded, a remote endpoint it names needs ``trust`` and gets no key."""
        if self.llm:
            return run_llm_spec(run, self.llm, trust=trust)
        return run_model_spec(run, self.base_model, self.llm_dir, self.lora)

    def profiler_spec(self, run: str | Path, trust: bool = False) -> tuple[str, dict[str, Any]]:
        """(profiler spec, LLM options) of the run's ``profiler``: an ``llm:SPEC`` it names is checked like
        :meth:`llm_spec`."""
        if self.profiler.startswith("llm:"):
            spec, options = run_llm_spec(run, self.profiler[4:], trust=trust)
            return f"llm:{spec}", options
        return self.profiler, {}


def retriever_prior(shape: tuple[int, int], scores: np.ndarray | None = None, kind: str = "rank") -> np.ndarray:
    """(B, K) the retriever's log-prior over its candidates (retriever order, best first)."""
    if kind == "score" and scores is not None:
        x = np.asarray(scores, dtype=np.float64)
        x = np.where(np.isfinite(x), x, np.nanmin(np.where(np.isfinite(x), x, np.inf)) - 50.0)
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    K = shape[1]
    return np.broadcast_to(-np.log(np.arange(1, K + 1, dtype=np.float64))[None, :], shape).copy()


def fuse(llm_logprobs: np.ndarray, weight: float, scores: np.ndarray | None = None, kind: str = "rank") -> np.ndarray:
    """(B, K) fused scores for candidates in retriever order: log_softmax(llm) + w * retriever prior."""
    prior = retriever_prior(llm_logprobs.shape, scores, kind)
    if math.isinf(weight):
        return prior
    x = llm_logprobs.astype(np.float64)
    x = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    return x + weight * prior


def order_by(scores: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidates by score (desc, NaN = -inf), ties kept in retriever order (stable)."""
    idx = np.argsort(-np.where(np.isnan(scores), -np.inf, scores), axis=1, kind="stable")
    return np.take_along_axis(candidates, idx, 1), np.take_along_axis(scores, idx, 1)


def positional_ranks(fused: np.ndarray, candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in the order :func:`order_by` gives (score desc, ties in candidate order),
    so the rank is the target's position in the list written; a target not among the candidates -> 10**9."""
    s = np.where(np.isnan(fused), -np.inf, np.asarray(fused, dtype=np.float64))  # (B, K)
    hit = np.asarray(candidates) == np.asarray(targets)[:, None]  # (B, K)
    found = hit.any(axis=1)
    j = hit.argmax(axis=1)  # the target's column (first match)
    t = s[np.arange(len(s)), j][:, None]  # (B, 1)
    before = (s > t) | ((s == t) & (np.arange(s.shape[1])[None, :] < j[:, None]))
    return np.where(found, before.sum(axis=1) + 1, 10**9).astype(np.int64)


# ---------------------------------------------------------------------------- the ranker
class LLMRanker:
    """Ranks candidate lists with an LLM; ``weight`` fuses it with the retriever (see module doc). Implements
    :class:`palr.rank.protocol.Ranker`; ``weight = inf`` is the retriever's order, and the LLM is not asked.

    ``retriever``: the retriever's name, for labels; ``chosen_on``: where ``weight`` was chosen (labels)."""

    def __init__(self, llm: Any, builder: PromptBuilder, mode: Mode = "verbalizer", weight: float = 0.0,
                 batch_size: int = 32, n_generate: int = 10, fusion: str = "rank",
                 allow_fallback: bool = False, retriever: str = "retriever", chosen_on: str = "") -> None:
        self.llm, self.builder, self.mode, self.weight, self.fusion = llm, builder, mode, weight, fusion
        self.batch_size, self.n_generate = batch_size, n_generate
        self.allow_fallback = allow_fallback  # False: an LLM failure stops the command (LLMUnavailable, ...)
        self.retriever, self.chosen_on = retriever, chosen_on
        self._failed_users = 0  # users for whom the retriever's order stood, since this ranker was built
        self._lock = threading.Lock()  # the counter only: threads share a ranker, each call keeps its own notes
        self._item_ids: np.ndarray | None = None
        self._labels: list[str] | None = None
        if mode == "generative" and getattr(llm, "tokenizer", None) is None:

            raise PalrError(f"generative ranking needs a local model (hf:/mini:); {getattr(llm, 'name', 'this LLM')} "
                            "has no tokenizer here: use the verbalizer mode")

    # -- the protocol's declarations
    @property
    def llm_ranker(self) -> LLMRanker:
        return self

    @property
    def failed_users(self) -> int:
        return self._failed_users

    def components_at(self, weight: float) -> tuple[str, ...]:
        """What the order consults at ``weight``: the LLM, the retriever's prior, or both."""
        if math.isinf(weight):
            return (f"{self.retriever} order",)
        return (LLM,) if weight == 0 else (LLM, f"{self.retriever} {self.fusion}")

    @property
    def components(self) -> tuple[str, ...]:
        return self.components_at(self.weight)

    @property
    def label(self) -> str:
        unused = unused_reason(self.weight, self.chosen_on) if math.isinf(self.weight) else ""
        return label(self.components, unused)

    # -- verbalizer
    def _item_token_ids(self) -> np.ndarray:
        if self._item_ids is None:

            self._item_ids = item_token_ids(self.llm.tokenizer, len(self.builder.catalog))
        return self._item_ids

    def verbalizer_logprobs(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None],
                            candidates: np.ndarray) -> np.ndarray:
        """(B, K) log p(label of candidate k | prompt), one forward pass per batch of users."""
        out = np.empty(candidates.shape, dtype=np.float32)
        for s in range(0, len(histories), self.batch_size):
            sl = slice(s, s + self.batch_size)
            cands = candidates[sl]
            if self.builder.style == "tokens":
                ps = [self.builder.prompt("verbalizer", h, p, c) for h, p, c in zip(histories[sl], profiles[sl], cands)]
                if hasattr(self.llm, "next_token_logprobs"):
                    lp = self.llm.next_token_logprobs(ps)  # (b, V)
                    out[sl] = np.take_along_axis(lp, self._item_token_ids()[cands], axis=1)
                else:  # a served embedded model: each candidate's item token is its label
                    out[sl] = np.stack([self.llm.score_choices([p], [item_token(int(i)) for i in c])[0]
                                        for p, c in zip(ps, cands)])
            else:
                labels = self.text_labels(cands.shape[1])
                ps = [self.builder.prompt("verbalizer", h, p, c, labels) for h, p, c in
                      zip(histories[sl], profiles[sl], cands)]
                out[sl] = self.llm.score_choices(ps, labels)
        return out

    def text_labels(self, n: int) -> list[str]:
        """Candidate labels: for a local model, ``n`` labels that are one token each in its tokenizer (checked;
        an error if it has too few); for a remote one the same pool in the same order (A..Z, a..z, 0..99, AA..),
        scored exactly by the backend whether or not they are single tokens there."""

        tok = getattr(self.llm, "tokenizer", None)
        if tok is None:
            return [" " + x for x in candidate_labels()[:n]]
        if self._labels is None or len(self._labels) < n:
            self._labels = single_token_labels(tok, n)
        return self._labels[:n]

    # -- generative
    def generate_orders(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None],
                        candidates: np.ndarray) -> tuple[np.ndarray, int]:
        """(B, K) pseudo log-probs from constrained generation (named items first, in the model's order)."""

        tok = self.llm.tokenizer
        out = np.full(candidates.shape, -np.inf, dtype=np.float32)
        invalid = 0
        for s in range(0, len(histories), self.batch_size):
            sl = slice(s, s + self.batch_size)
            cands = candidates[sl]
            tries = [CandidateTrie.build(tok, [self.builder.item(int(c)) for c in row],
                                         "" if self.builder.style == "tokens" else ",", self.n_generate)
                     for row in cands]
            ps = [self.builder.prompt("recommend_retrieval", h, p, c, n=self.n_generate)
                  for h, p, c in zip(histories[sl], profiles[sl], cands)]
            texts = self.llm.generate(ps, max_new_tokens=max(t.max_tokens() for t in tries),
                                      prefix_allowed_tokens_fn=lambda b, ids, tries=tries: tries[b].allowed(ids.tolist()),
                                      skip_special_tokens=False)
            for b, (text, trie) in enumerate(zip(texts, tries)):
                picked, bad = trie.parse(tok.encode(text, add_special_tokens=False))
                invalid += bad
                for rank, k in enumerate(picked):
                    out[s + b, k] = -float(rank)
        # items the model did not name: below the named ones, in retriever order
        K = candidates.shape[1]
        rest = -1000.0 - np.arange(K, dtype=np.float32)[None, :]
        return np.where(np.isfinite(out), out, rest), invalid

    # -- both
    def rank(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None], candidates: np.ndarray,
             scores: np.ndarray | None = None, users: np.ndarray | None = None, *, weight: float | None = None,
             ) -> RankResult:
        """Rank each row of ``candidates`` (retriever order, best first; ``scores`` = the retriever's);
        ``users`` (data set rows, unused here) is part of the rankers' shared contract.

        A failure of the LLM backend (:class:`LLMUnavailable`, :class:`LLMRequestFailed`) keeps the retriever's
        order for the batch when ``allow_fallback``, and stops otherwise; any other exception is a bug and
        propagates."""
        w = self.weight if weight is None else weight
        t0 = time.perf_counter()
        notes: list[str] = []
        invalid = 0
        nan = np.full(candidates.shape, np.nan, dtype=np.float32)
        if math.isinf(w):  # the retriever's order: the LLM would not count
            lp, failed = nan, np.zeros(len(candidates), dtype=bool)
        else:
            try:
                if self.mode == "verbalizer":
                    lp = self.verbalizer_logprobs(histories, profiles, candidates)
                else:
                    lp, invalid = self.generate_orders(histories, profiles, candidates)
                failed = ~np.isfinite(lp).any(axis=1)
            except (LLMUnavailable, LLMRequestFailed) as e:
                if not self.allow_fallback:
                    raise
                log.warning("LLM ranking failed (%s: %s); keeping the retriever's order", type(e).__name__, e)
                why = "LLM unreachable" if isinstance(e, LLMUnavailable) else f"LLM failed: {e}"
                notes.append(f"{why}: the retriever's order stands (--allow-fallback)")
                lp, failed = nan, np.ones(len(candidates), dtype=bool)
        if n_failed := note_failed_rows(failed, notes):
            with self._lock:
                self._failed_users += n_failed
        prior = retriever_prior(candidates.shape, scores, self.fusion)
        fused = prior if math.isinf(w) else fuse(floor_missing(lp), w, scores, self.fusion)
        fused[failed] = prior[failed]
        order, ordered = order_by(fused, candidates)
        return RankResult(order, ordered, lp, failed, time.perf_counter() - t0, notes, invalid,
                          candidate_scores=fused, components=self.components_at(w),
                          fallback=(f"{self.retriever} order",))


Ranker = LLMRanker  # the name it had before the Ranker protocol (palr.rank.protocol)


def floor_missing(lp: np.ndarray, gap: float = 30.0) -> np.ndarray:
    """Log-probs with each row's missing entries (-inf/nan: a label outside a server's top-k, or not named by a
    parsed answer) set ``gap`` below the row's lowest score, so they follow the scored candidates in retriever
    order instead of winning (0) or poisoning the softmax (-inf). A row with no score at all becomes 0s."""
    x = np.asarray(lp, dtype=np.float64)
    ok = np.isfinite(x)
    low = np.where(ok, x, np.inf).min(axis=1, keepdims=True)
    low = np.where(np.isfinite(low), low - gap, 0.0)
    return np.where(ok, x, low)


def choose_weight(llm_logprobs: np.ndarray, candidates: np.ndarray, targets: np.ndarray,
                  grid: Sequence[float] = FUSION_GRID, k: int = 10, scores: np.ndarray | None = None,
                  ) -> tuple[str, float, dict[str, float]]:
    """The fusion kind and weight with the best NDCG@k on **validation** users.

    Returns (kind, weight, {"rank:0.5": ndcg, "score:0.5": ndcg, ...}); ties prefer "rank" and the smaller
    weight; "rank:inf" is the retriever alone.
    """

    kinds = ["rank"] + (["score"] if scores is not None else [])
    table = {}
    for kind in kinds:
        for w in grid:
            table[f"{kind}:{w}"] = ndcg(positional_ranks(fuse(llm_logprobs, w, scores, kind), candidates, targets), k)
    best = max(table, key=lambda key: (round(table[key], 12), key.startswith("rank"),
                                       -float(key.split(":")[1]) if "inf" not in key else -1e9))
    kind, w = best.split(":")
    return kind, float(w), table
