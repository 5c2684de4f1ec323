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
``w = inf`` is the retriever alone. If the LLM fails
for a user, the retriever's order stands and the result says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from palr import prompts
from palr.data.dataset import Catalog
from palr.llm.mini import item_token

log = logging.getLogger(__name__)

Mode = Literal["verbalizer", "generative"]
Style = Literal["tokens", "text"]
FUSION_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)


# ---------------------------------------------------------------------------- prompts per style
class PromptBuilder:
    """Prompts and answers for a catalogue in one of two item styles.

    ``tokens``: items are their added tokens ``<iN>`` (the embedded model; compact and exact);
    ``text``: items are quoted titles (``"Heat (1995)"``, ``"ASIN (title)"``) via :mod:`palr.prompts`.
    """

    def __init__(self, catalog: Catalog, style: Style = "tokens", history_len: int = prompts.MAX_HISTORY,
                 max_title_tokens: int = prompts.MAX_TITLE_TOKENS) -> None:
        self.catalog, self.style, self.history_len, self.max_title_tokens = catalog, style, history_len, max_title_tokens
        self.nouns = prompts.nouns(catalog)

    def items(self, items: Sequence[int]) -> str:
        if self.style == "tokens":
            return "".join(item_token(i) for i in items)
        return prompts.render_items(self.catalog, items, self.max_title_tokens)

    def item(self, i: int) -> str:
        return item_token(i) if self.style == "tokens" else prompts.render_item(self.catalog, i, self.max_title_tokens)

    def prompt(self, task: str, history: Sequence[int], profile: str | None,
               candidates: Sequence[int] | None = None, labels: Sequence[str] | None = None, n: int = 10) -> str:
        hist = prompts.recent(history, self.history_len)
        candidates = [] if candidates is None else [int(c) for c in candidates]
        if self.style == "text":
            kw = {"max_history": self.history_len, "max_title_tokens": self.max_title_tokens}
            if task == "recommend":
                return prompts.recommend_prompt(self.catalog, hist, profile=profile, n=n, **kw)
            if task == "recommend_retrieval":
                return prompts.retrieval_prompt(self.catalog, hist, profile, candidates, n=n, **kw)
            return prompts.verbalizer_prompt(self.catalog, hist, profile, candidates, labels or [], **kw)
        w = self.nouns
        prof = f"User profile: {prompts.clean_text(profile)}.\n" if profile else ""
        head = {"recommend": f"Recommend {n} other {w.plural} based on user's {w.history}.",
                "recommend_retrieval": f"Recommend {n} other {w.plural} based on user's {w.history} from the candidate list.",
                "verbalizer": f"Choose the next of the candidate {w.plural} based on user's {w.history}."}[task]
        cands = f"The candidates are {self.items(candidates)}.\n" if task != "recommend" else ""
        return f"{head}\nInput: User {w.verb} {w.plural} {self.items(hist)}.\n{prof}{cands}Output:"

    def answer(self, task: str, targets: Sequence[int], labels: dict[int, str] | None = None) -> str:
        if task == "verbalizer":
            t = int(targets[0])
            return labels[t] if labels else self.item(t)
        if self.style == "tokens":
            return self.items(targets)
        return prompts.answer_text(self.catalog, targets, self.max_title_tokens)


# ---------------------------------------------------------------------------- results
@dataclass
class RankResult:
    """Per user: candidates reordered best first, fused scores, raw LLM log-probs, failure flags."""

    order: np.ndarray  # (B, K) item indices, best first
    scores: np.ndarray  # (B, K) fused scores aligned with order
    llm_logprobs: np.ndarray  # (B, K) aligned with the *input* candidates (nan where the LLM failed)
    failed: np.ndarray  # (B,) bool: the retriever's order stands
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    invalid_generations: int = 0


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
class Ranker:
    """Ranks candidate lists with an LLM; ``weight`` fuses it with the retriever (see module doc)."""

    def __init__(self, llm: Any, builder: PromptBuilder, mode: Mode = "verbalizer", weight: float = 0.0,
                 batch_size: int = 32, n_generate: int = 10, fusion: str = "rank") -> None:
        self.llm, self.builder, self.mode, self.weight, self.fusion = llm, builder, mode, weight, fusion
        self.batch_size, self.n_generate = batch_size, n_generate
        self._item_ids: np.ndarray | None = None

    # -- verbalizer
    def _item_token_ids(self) -> np.ndarray:
        if self._item_ids is None:
            from palr.llm.mini import item_token_ids

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
                lp = self.llm.next_token_logprobs(ps)  # (b, V)
                out[sl] = np.take_along_axis(lp, self._item_token_ids()[cands], axis=1)
            else:
                labels = self.text_labels(cands.shape[1])
                ps = [self.builder.prompt("verbalizer", h, p, c, labels) for h, p, c in
                      zip(histories[sl], profiles[sl], cands)]
                out[sl] = self.llm.score_choices(ps, labels)
        return out

    def text_labels(self, n: int) -> list[str]:
        from palr.llm.base import single_token_labels

        tok = getattr(self.llm, "tokenizer", None)
        if tok is None:  # remote models: letters, then two-letter labels (scored exactly if multi-token)
            base = [chr(65 + k) for k in range(26)]
            return [" " + x for x in (base + [a + b for a in base for b in base])[:n]]
        return single_token_labels(tok, n)

    # -- generative
    def generate_orders(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None],
                        candidates: np.ndarray) -> tuple[np.ndarray, int]:
        """(B, K) pseudo log-probs from constrained generation (named items first, in the model's order)."""
        from palr.ranking_trie import CandidateTrie

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
             scores: np.ndarray | None = None, weight: float | None = None) -> RankResult:
        """Rank each row of ``candidates`` (retriever order, best first; ``scores`` = the retriever's)."""
        w = self.weight if weight is None else weight
        t0 = time.perf_counter()
        failed = np.zeros(len(histories), dtype=bool)
        notes: list[str] = []
        invalid = 0
        try:
            if self.mode == "verbalizer":
                lp = self.verbalizer_logprobs(histories, profiles, candidates)
            else:
                lp, invalid = self.generate_orders(histories, profiles, candidates)
            bad = ~np.isfinite(lp).all(axis=1) if self.mode == "verbalizer" else np.zeros(len(lp), bool)
        except Exception as e:  # noqa: BLE001 - any LLM failure for this batch: the retriever's order stands
            log.warning("LLM ranking failed (%s: %s); keeping the retriever's order", type(e).__name__, e)
            notes.append(f"LLM failed: {type(e).__name__}: {e}")
            lp = np.full(candidates.shape, np.nan, dtype=np.float32)
            bad = np.ones(len(histories), dtype=bool)
        failed |= bad
        fused = fuse(np.where(np.isfinite(lp), lp, 0.0), w, scores, self.fusion)
        fused[failed] = retriever_prior(candidates.shape, scores, self.fusion)[failed]
        order, scores = order_by(fused, candidates)
        return RankResult(order, scores, lp, failed, time.perf_counter() - t0, notes, invalid)


def choose_weight(llm_logprobs: np.ndarray, candidates: np.ndarray, targets: np.ndarray,
                  grid: Sequence[float] = FUSION_GRID, k: int = 10, scores: np.ndarray | None = None,
                  ) -> tuple[str, float, dict[str, float]]:
    """The fusion kind and weight with the best NDCG@k on **validation** users.

    Returns (kind, weight, {"rank:0.5": ndcg, "score:0.5": ndcg, ...}); ties prefer "rank" and the smaller
    weight; "rank:inf" is the retriever alone.
    """
    from palr.evaluation import ndcg

    kinds = ["rank"] + (["score"] if scores is not None else [])
    table = {}
    for kind in kinds:
        for w in grid:
            table[f"{kind}:{w}"] = ndcg(positional_ranks(fuse(llm_logprobs, w, scores, kind), candidates, targets), k)
    best = max(table, key=lambda key: (round(table[key], 12), key.startswith("rank"),
                                       -float(key.split(":")[1]) if "inf" not in key else -1e9))
    kind, w = best.split(":")
    return kind, float(w), table
