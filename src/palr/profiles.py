"""PALR step 1: user profiles, as short keywords ("drama movies", "skin care").

* :class:`AttributeProfiler` (no LLM): a faithful, deterministic summary of the history's genres/categories
  with shares (the fraction of history items carrying the tag), eras (decades, for movies) and recency, e.g.
  ``drama movies (45%), comedy movies (30%); mostly 1990s films; lately: thriller, crime``.
* :class:`LLMProfiler`: the paper's idea; the model writes the keywords from the history (``profile_prompt``);
  the answer is checked (not empty, not too long, not an echo of the prompt) and the attribute profile is used
  when the check or the model fails, with ``source="attributes"`` and a ``note`` saying why.
* :class:`ProfileCache`: SQLite, keyed by data set, user, history hash, backend name and prompt version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from palr.data.dataset import Catalog, Dataset
from palr.errors import PalrError
from palr.llm.base import LLM
from palr.prompts import PROMPT_VERSION, clean_text, profile_prompt

log = logging.getLogger(__name__)

__all__ = [
    "AttributeProfiler",
    "LLMProfiler",
    "Profile",
    "ProfileCache",
    "Profiler",
    "history_hash",
    "make_profiler",
    "profile_dataset",
    "profile_users",
    "user_history",
]


@dataclass
class Profile:
    """A user's profile. ``source`` is "attributes" or "llm"; ``note`` says why a fallback happened."""

    user: str
    profile: str
    source: str
    keywords: list[str]
    backend: str = "attributes"
    prompt_version: str = PROMPT_VERSION
    history_hash: str = ""
    n_history: int = 0
    note: str | None = None
    shares: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Profiler(Protocol):
    """Turns a history (dense item indices, oldest first) into a :class:`Profile`."""

    name: str

    def profile_many(self, users: Sequence[str], histories: Sequence[Sequence[int]],
                     catalog: Catalog) -> list[Profile]: ...


def history_hash(catalog: Catalog, history: Sequence[int]) -> str:
    """sha256 (16 hex) of the history's original item ids, in order."""
    joined = "\x1f".join(catalog.item_ids[int(i)] for i in history)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _decade(catalog: Catalog, i: int) -> int | None:
    year = catalog.attributes[i].get("year")
    if year is None:
        m = re.search(r"\((\d{4})\)\s*$", catalog.titles[i] or "")
        year = int(m.group(1)) if m else None
    try:
        return int(year) // 10 * 10 if year is not None else None
    except (TypeError, ValueError):
        return None


class AttributeProfiler:
    """Deterministic profile from the history's tags (genres/categories), decades and recent items.

    Args:
        top_k: favoured tags listed with shares; recent: last items read for "lately";
        min_share: tags under this share are left out (the top tag always stays).
    """

    name = "attributes"

    def __init__(self, top_k: int = 3, recent: int = 5, min_share: float = 0.1) -> None:
        self.top_k, self.recent, self.min_share = top_k, recent, min_share

    @staticmethod
    def _keyword(catalog: Catalog, tag: str) -> str:
        tag = clean_text(tag).lower()
        if catalog.kind == "movies":
            return f"{tag} movies"
        return tag

    @staticmethod
    def _most_specific(catalog: Catalog, items: list[int], counts: Counter[str]) -> Counter[str]:
        """Of tags carried by exactly the same history items (a category path: "Hair Care" > "Shampoos"),
        keep only the deepest one, so a profile does not repeat one taste at three levels."""
        carriers: dict[str, set[int]] = {}
        depth: dict[str, int] = {}
        for pos, i in enumerate(items):
            for d, t in enumerate(catalog.tags(i)):
                carriers.setdefault(t, set()).add(pos)
                depth[t] = max(depth.get(t, 0), d)
        best: dict[frozenset[int], str] = {}
        for t in sorted(carriers):
            key = frozenset(carriers[t])
            if key not in best or depth[t] > depth[best[key]]:
                best[key] = t
        keep = set(best.values())
        return Counter({t: c for t, c in counts.items() if t in keep})

    def profile(self, user: str, history: Sequence[int], catalog: Catalog) -> Profile:
        items = [int(i) for i in history]
        h = history_hash(catalog, items)
        if not items:
            return Profile(str(user), "no history", "attributes", [], history_hash=h, note="empty history")
        counts: Counter[str] = Counter()
        last_seen: dict[str, int] = {}
        for pos, i in enumerate(items):
            for t in dict.fromkeys(catalog.tags(i)):
                counts[t] += 1
                last_seen[t] = pos
        n = len(items)
        if catalog.kind != "movies":
            counts = self._most_specific(catalog, items, counts)
        # most frequent first; ties: seen more recently, then name (deterministic, no set order)
        ranked = sorted(counts, key=lambda t: (-counts[t], -last_seen[t], t))
        fav = [t for k, t in enumerate(ranked[:self.top_k]) if k == 0 or counts[t] / n >= self.min_share]
        keywords = [self._keyword(catalog, t) for t in fav]
        shares = {self._keyword(catalog, t): round(counts[t] / n, 3) for t in fav}
        parts = [", ".join(f"{self._keyword(catalog, t)} ({counts[t] / n:.0%})" for t in fav)] if fav else []
        if catalog.kind == "movies":
            decades = Counter(d for d in (_decade(catalog, i) for i in items) if d is not None)
            if decades:
                top = sorted(decades, key=lambda d: (-decades[d], -d))
                share = decades[top[0]] / sum(decades.values())
                if share >= 0.5 or len(top) == 1:
                    era = f"mostly {top[0]}s films"
                else:
                    era = f"mainly {top[0]}s and {top[1]}s films"
                parts.append(era)
                keywords.append(f"{top[0]}s films")
        tail = items[-self.recent:]
        lately: Counter[str] = Counter(t for i in tail for t in dict.fromkeys(catalog.tags(i)))
        if catalog.kind != "movies":
            lately = self._most_specific(catalog, tail, lately)
        if lately:
            pos = {t: max(k for k, i in enumerate(tail) if t in catalog.tags(i)) for t in lately}
            recent_tags = sorted(lately, key=lambda t: (-lately[t], -pos[t], t))[:2]
            parts.append("lately: " + ", ".join(clean_text(t).lower() for t in recent_tags))
        text = "; ".join(parts) if parts else "no genre or category information"
        return Profile(str(user), text, "attributes", keywords, history_hash=h, n_history=n, shares=shares)

    def profile_many(self, users: Sequence[str], histories: Sequence[Sequence[int]],
                     catalog: Catalog) -> list[Profile]:
        return [self.profile(u, h, catalog) for u, h in zip(users, histories)]


def _check_answer(answer: str, prompt: str, max_chars: int, max_keywords: int) -> tuple[list[str], str | None]:
    """(keywords, None) for a usable answer, else ([], reason)."""
    text = answer.strip().strip('"').split("\n")[0].strip()
    if not text:
        return [], "empty answer"
    if len(text) > max_chars:
        return [], f"answer longer than {max_chars} characters"
    low = " ".join(text.lower().split())
    if len(low) >= 12 and low in " ".join(prompt.lower().split()):
        return [], "answer echoes the prompt"
    keywords = [clean_text(k).strip(" .'") for k in re.split(r"[,;]", text)]
    keywords = [k for k in keywords if k]
    if not keywords or len(keywords) > max_keywords:
        return [], f"{len(keywords)} keywords (expected 1..{max_keywords})"
    for k in keywords:
        letters = sum(ch.isalpha() for ch in k)
        if len(k.split()) > 6 or letters < max(2, len(k) // 2):
            return [], f"keyword {k[:40]!r} does not look like a keyword"
    return keywords, None


class LLMProfiler:
    """Profiles written by an LLM from ``profile_prompt``; the attribute profile whenever that fails."""

    def __init__(self, llm: LLM, fallback: AttributeProfiler | None = None, *, n_keywords: int = 5,
                 max_new_tokens: int = 48, max_chars: int = 200, batch_size: int = 16) -> None:
        self.llm = llm
        self.fallback = fallback or AttributeProfiler()
        self.n_keywords, self.max_new_tokens, self.max_chars = n_keywords, max_new_tokens, max_chars
        self.batch_size = batch_size
        self.name = f"llm:{getattr(llm, 'name', type(llm).__name__)}"

    def _fallback(self, user: str, history: Sequence[int], catalog: Catalog, why: str) -> Profile:
        p = self.fallback.profile(user, history, catalog)
        p.backend = self.name
        p.note = f"LLM profile rejected ({why}); attribute profile used"
        return p

    def profile_many(self, users: Sequence[str], histories: Sequence[Sequence[int]],
                     catalog: Catalog) -> list[Profile]:
        out: list[Profile] = []
        for start in range(0, len(users), self.batch_size):
            us, hs = users[start:start + self.batch_size], histories[start:start + self.batch_size]
            prompts = [profile_prompt(catalog, h, n_keywords=self.n_keywords) for h in hs]
            try:
                answers = self.llm.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0,
                                            stop=["\n"])
            except Exception as e:  # noqa: BLE001 - any backend failure falls back, and says so
                log.warning("LLM profiler failed (%s: %s); using attribute profiles", type(e).__name__, e)
                out.extend(self._fallback(u, h, catalog, f"{type(e).__name__}: {e}") for u, h in zip(us, hs))
                continue
            for u, h, prompt, answer in zip(us, hs, prompts, answers):
                keywords, why = _check_answer(answer, prompt, self.max_chars, self.n_keywords)
                if why:
                    out.append(self._fallback(u, h, catalog, why))
                    continue
                out.append(Profile(str(u), ", ".join(keywords), "llm", keywords, backend=self.name,
                                   history_hash=history_hash(catalog, h), n_history=len(h)))
        return out


class ProfileCache:
    """SQLite cache of profiles keyed by (dataset, user, history hash, backend, prompt version)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS profiles (dataset TEXT, user TEXT, history_hash TEXT, "
                         "backend TEXT, prompt_version TEXT, profile TEXT, "
                         "PRIMARY KEY (dataset, user, history_hash, backend, prompt_version))")
        self._db.commit()
        self.hits = self.misses = 0

    def get(self, dataset: str, user: str, hhash: str, backend: str) -> Profile | None:
        row = self._db.execute("SELECT profile FROM profiles WHERE dataset=? AND user=? AND history_hash=? "
                               "AND backend=? AND prompt_version=?",
                               (dataset, user, hhash, backend, PROMPT_VERSION)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return Profile(**json.loads(row[0]))

    def put(self, dataset: str, backend: str, profiles: Sequence[Profile]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                             [(dataset, p.user, p.history_hash, backend, p.prompt_version,
                               json.dumps(p.to_dict())) for p in profiles])
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def user_history(dataset: Dataset, user: str, stage: str = "all") -> Any:
    """The history a profile is built from: the whole sequence ("all") or what precedes a "valid"/"test" target."""
    try:
        seq = dataset.sequences[dataset.user_index(str(user))]
    except KeyError:
        raise PalrError(f"unknown user {user!r} in {dataset.name} ({dataset.n_users} users, e.g. "
                        f"{', '.join(dataset.user_ids[:3])})") from None
    cut = {"all": 0, "test": 1, "valid": 2}
    if stage not in cut:
        raise PalrError(f"unknown history stage {stage!r}; use all, valid or test")
    return seq[:len(seq) - cut[stage]]


def profile_users(dataset: Dataset, users: Sequence[str], profiler: Profiler, *, stage: str = "all",
                  cache: ProfileCache | None = None, progress: bool = False,
                  chunk: int = 64) -> list[Profile]:
    """Profiles of ``users`` (original ids), from the cache where present, in the order given."""
    histories = [user_history(dataset, u, stage) for u in users]
    cat = dataset.catalog
    result: list[Profile | None] = [None] * len(users)
    todo: list[int] = []
    for k, (u, h) in enumerate(zip(users, histories)):
        cached = cache.get(dataset.name, str(u), history_hash(cat, h), profiler.name) if cache else None
        if cached is not None:
            result[k] = cached
        else:
            todo.append(k)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"profiles ({profiler.name})", unit="user")
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        made = profiler.profile_many([str(users[k]) for k in idx], [histories[k] for k in idx], cat)
        for k, p in zip(idx, made):
            result[k] = p
        if cache is not None:
            cache.put(dataset.name, profiler.name, made)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return [p for p in result if p is not None]


def make_profiler(llm: str | None = None, **llm_options: Any) -> Profiler:
    """The attribute profiler, or an LLM profiler over ``load_llm(llm, **llm_options)``."""
    if not llm:
        return AttributeProfiler()
    from palr.llm.base import load_llm

    return LLMProfiler(load_llm(llm, **llm_options))


def profile_dataset(dataset: Dataset, users: Sequence[str] | None = None, *, llm: str | None = None,
                    cache: str | Path | None = None, stage: str = "all", progress: bool = False) -> list[Profile]:
    """Profiles of ``users`` (all users when None) of a loaded data set: what ``palr profile`` prints."""
    wanted = list(dataset.user_ids) if users is None else [str(u) for u in users]
    for u in wanted:
        user_history(dataset, u, stage)  # unknown users fail before any model is loaded
    store = ProfileCache(cache) if cache else None
    try:
        return profile_users(dataset, wanted, make_profiler(llm), stage=stage, cache=store, progress=progress)
    finally:
        if store is not None:
            store.close()
