"""Explanations that are true: each recommended item is explained by history items that really connect to it.

For a recommended item ``i`` the history items are ranked by the model's item embeddings (the retriever's, centred
so that a few "hub" items are not close to everything) plus the share of attributes they have in common; the best
one or two are named, each with the attributes **that pair** shares (``"Alien (1979)" (also Sci-Fi)``), never
the union over several items. A history item that shares no attribute is named only when the embeddings put it
close (and then says so). The recommended item's own title is never repeated (it stands next to the sentence),
catalogue text is quoted and cleaned (:func:`palr.prompts.clean_text`), and a history title that reads like an
instruction is never quoted. Items from the popularity fallback (no history) are explained by their popularity.

Each explanation is returned with its evidence (``because``: the history items and the shared attributes), so a
test can check every claim against the catalogue. With a text LLM, :func:`llm_explanations` asks it for one
sentence from that evidence and keeps it only when :func:`check_llm_sentence` finds no claim beyond it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palr.data.dataset import Catalog
from palr.llm.prompts import clean_text, explanation_prompt, looks_like_instruction

__all__ = ["Explanation", "check_llm_sentence", "explain_items", "explain_popular", "llm_explanations", "quote_title"]


@dataclass
class Explanation:
    """One sentence and the evidence behind it: ``because`` = [(history item index, shared attributes)]."""

    text: str
    because: list[tuple[int, list[str]]] = field(default_factory=list)

    def to_dict(self, catalog: Catalog) -> dict[str, Any]:
        return {"text": self.text, "because": [{"item": catalog.item_ids[h], "title": catalog.titles[h],
                                                "shared": list(shared)} for h, shared in self.because]}


def quote_title(catalog: Catalog, i: int, max_words: int = 10) -> str:
    """``"Title"`` cleaned and quoted; an instruction-like title is replaced by the item id."""
    title = catalog.titles[int(i)] or ""
    if not title or looks_like_instruction(title):
        return f"item {clean_text(catalog.item_ids[int(i)])}"
    return f'"{clean_text(title, max_words)}"'


def _unit_vectors(item_vectors: Callable[[], np.ndarray] | np.ndarray | None) -> np.ndarray | None:
    vecs = item_vectors() if callable(item_vectors) else item_vectors
    if vecs is None:
        return None
    vecs = np.asarray(vecs, dtype=np.float64)
    vecs = vecs - vecs.mean(axis=0, keepdims=True)
    return vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)


def explain_items(catalog: Catalog, history: Sequence[int], items: Sequence[int],
                  item_vectors: Callable[[], np.ndarray] | np.ndarray | None = None, *, recent: int = 50,
                  max_reasons: int = 2, min_similarity: float = 0.2) -> list[Explanation]:
    """One :class:`Explanation` per recommended item (dense indices), from the last ``recent`` history items."""
    hist = list(dict.fromkeys(int(h) for h in history))[-recent:]
    hist = [h for h in hist if not looks_like_instruction(catalog.titles[h] or "")] or hist
    vecs = _unit_vectors(item_vectors)
    hist_tags = [set(catalog.tags(h)) for h in hist]
    out = []
    for i in items:
        i = int(i)
        tags = catalog.tags(i)
        tag_set = set(tags)
        shared = [[t for t in tags if t in ht] for ht in hist_tags]  # per pair, in the item's own tag order
        jacc = np.array([len(s) / max(1, len(tag_set | ht)) for s, ht in zip(shared, hist_tags)])
        cos = vecs[hist] @ vecs[i] if vecs is not None and hist else np.zeros(len(hist))
        score = cos + jacc
        order = np.lexsort((-np.arange(len(hist)), -score))  # ties: the more recent item
        because: list[tuple[int, list[str]]] = []
        for j in order:
            if len(because) == max_reasons:
                break
            if shared[j] or cos[j] >= min_similarity:
                because.append((hist[j], shared[j][:3]))
        out.append(Explanation(_sentence(catalog, because, bool(hist)), because))
    return out


def _sentence(catalog: Catalog, because: list[tuple[int, list[str]]], has_history: bool) -> str:
    if not because:
        return ("Ranked high for your history as a whole; no single item you chose is close to it."
                if has_history else "Popular with other users.")
    parts = []
    for h, shared in because:
        why = f" (also {', '.join(clean_text(t) for t in shared)})" if shared else " (close to it in the model's item embeddings)"
        parts.append(quote_title(catalog, h) + why)
    return f"Because you chose {' and '.join(parts)}."


def explain_popular(count: int, n_users: int) -> Explanation:
    """An item of the popularity fallback (no usable history)."""
    return Explanation(f"Popular: chosen by {count} of {n_users} users in the training data.")


def _base_title(title: str) -> str:
    return re.sub(r"\s*\(\d{4}\)\s*$", "", title or "").strip().lower()


def check_llm_sentence(catalog: Catalog, item: int, evidence: list[tuple[int, list[str]]], text: str,
                       max_words: int = 40) -> str | None:
    """None if ``text`` may stand as the explanation, else why not: it must name a history item of the evidence,
    no other catalogue title (the recommended one aside), no attribute that the item does not share with an
    evidence item, and nothing that reads like an instruction."""
    low = " " + " ".join(text.lower().split()) + " "
    if not text.strip() or len(text.split()) > max_words:
        return "empty or too long"
    if looks_like_instruction(text):
        return "reads like an instruction"
    allowed = {int(item)} | {h for h, _ in evidence}
    named = {h for h, _ in evidence if _base_title(catalog.titles[h]) and _base_title(catalog.titles[h]) in low}
    if not named:
        return "names no history item of the evidence"
    for j, title in enumerate(catalog.titles):
        base = _base_title(title)
        if j not in allowed and len(base) >= 6 and f" {base}" in low and not any(base in _base_title(catalog.titles[a])
                                                                                   for a in allowed):
            return f"names another item ({clean_text(title, 8)})"
    shared = {t.lower() for _, tags in evidence for t in tags}
    words = set(re.findall(r"[a-z][a-z'-]+", low))
    for tag in {t for i in range(len(catalog)) for t in catalog.tags(i)}:
        if tag.lower() in words and tag.lower() not in shared:
            return f"claims an attribute the items do not share ({clean_text(tag)})"
    return None


def llm_explanations(llm: Any, catalog: Catalog, items: Sequence[int], templates: list[Explanation],
                     max_new_tokens: int = 48) -> list[tuple[Explanation, str]]:
    """One LLM-written sentence per item, from the template's evidence, checked by :func:`check_llm_sentence`;
    the template wherever the check (or the model) fails. Returns (explanation, "llm" | "template: why")."""

    todo = [k for k, e in enumerate(templates) if e.because]
    out: list[tuple[Explanation, str]] = [(e, "template: no evidence") for e in templates]
    if not todo:
        return out
    prompts = [explanation_prompt(catalog, int(items[k]), templates[k].because) for k in todo]
    try:
        texts = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    except Exception as e:  # noqa: BLE001 - explanations fall back to the templates, and say so
        return [(t, f"template: LLM failed ({type(e).__name__})") for t in templates]
    for k, text in zip(todo, texts):
        sentence = text.strip().split("\n")[0].split(". ")[0].strip().strip('"')
        sentence = sentence if sentence.endswith(".") else sentence + "."
        why = check_llm_sentence(catalog, int(items[k]), templates[k].because, sentence)
        if why is None:
            out[k] = (Explanation(clean_text(sentence), templates[k].because), "llm")
        else:
            out[k] = (templates[k], f"template: LLM sentence rejected ({why})")
    return out
