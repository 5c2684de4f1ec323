"""PALR step 1: user profiles, as short keywords ("drama movies", "skin care").

* :class:`AttributeProfiler` (no LLM): a faithful, deterministic summary of the history's genres/categories
  with shares (the fraction of history items carrying the tag), eras (decades, for movies) and recency, e.g.
  ``drama movies (45%), comedy movies (30%); mostly 1990s films; lately: thriller, crime``.
* :class:`LLMProfiler`: the paper's idea; the model writes the keywords from the history (``profile_prompt``);
  the answer is checked against the history: a keyword is kept only when it is *grounded* (one of its content
  words is a word of a history title or attribute, or the history's decade) and names no attribute the history
  does not have (a genre it never watched); an over-long list is trimmed to its first grounded keywords. The
  attribute profile is used when nothing survives or the model fails, with ``source="attributes"`` and a
  ``note`` saying why.
* :class:`ProfileCache`: SQLite, keyed by data set, user, history hash, backend name and prompt version.
* :class:`HistoryProfiles`: what ranking and fine-tuning read (the same profiler, the same cache), built by
  :func:`make_profiler` from a run's profiler spec: ``attributes``, ``llm`` (the ranking LLM) or ``llm:SPEC``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from palr.core.console import progress_enabled
from palr.core.errors import LLMUnavailable, PalrError
from palr.data.dataset import Catalog, Dataset
from palr.llm.prompts import PROMPT_VERSION, clean_text, profile_prompt
from palr.llm.protocol import LLM
from palr.llm.registry import load_llm

log = logging.getLogger(__name__)

__all__ = [
    "AttributeProfiler",
    "HistoryProfiles",
    "LLMProfiler",
    "Profile",
    "ProfileCache",
    "Profiler",
    "grounded_keywords",
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

    def __init__(self, top_k: int = 3, recent: int = 5, min_share: float = 0.1,
                 user_attributes: dict[str, dict[str, Any]] | None = None) -> None:
        self.top_k, self.recent, self.min_share = top_k, recent, min_share
        self.user_attributes = user_attributes or {}  # original user id -> attributes (ml-100k's u.user)

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
        who = user_attribute_text(self.user_attributes.get(str(user)))
        if who:
            text = f"{text}; {who}"
            keywords.append(who)
        return Profile(str(user), text, "attributes", keywords, history_hash=h, n_history=n, shares=shares)

    def profile_many(self, users: Sequence[str], histories: Sequence[Sequence[int]],
                     catalog: Catalog) -> list[Profile]:
        return [self.profile(u, h, catalog) for u, h in zip(users, histories)]


_GENERIC_WORDS = (
    "movie movies film films fan fans lover lovers genre genres classic classics favorite favourite favorites good "
    "great like likes enjoy enjoys watch watching watched user users show shows story stories product products item "
    "items old new popular older newer recent modern era eras and the of with a an in on for to from by or style "
    "type types kind kinds lot lots many mostly some very well best")


def _norm(word: str) -> str:
    """Lower-case letters and digits only, simple plural removed: "Comedies" -> "comedy", "Sci-Fi" -> "scifi"."""
    w = re.sub(r"[^0-9a-z]", "", word.lower())
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss") and not w[:-1].isdigit():
        return w[:-1]
    return w


_GENERIC = frozenset(_norm(w) for w in _GENERIC_WORDS.split())


def _words(text: str) -> list[str]:
    out = []
    for raw in re.split(r"[\s/,;:()\[\]]+", str(text)):
        w = _norm(raw)
        if w:
            out.append(w)
        if "-" in raw:  # "Sci-Fi": also "sci", "fi"
            out.extend(x for x in (_norm(p) for p in raw.split("-")) if x)
    return out


def _match(word: str, vocab: set[str]) -> bool:
    """Exact, or sharing a 5-letter stem with a vocabulary word ("romantic" ~ "romance", "animated" ~ "animation")."""
    if word in vocab:
        return True
    return len(word) >= 5 and any(len(v) >= 5 and v[:5] == word[:5] for v in vocab)


def _history_vocab(catalog: Catalog, history: Sequence[int]) -> set[str]:
    vocab: set[str] = set()
    for i in history:
        vocab.update(_words(_YEARLESS.sub("", catalog.titles[int(i)] or "")))
        for t in catalog.tags(int(i)):
            vocab.update(_words(t))
        d = _decade(catalog, int(i))
        if d is not None:
            vocab.update({str(d), f"{d}s", f"{d % 100:02d}s"})
    return vocab


_YEARLESS = re.compile(r"\(\d{4}\)\s*$")


def _catalog_tags(catalog: Catalog) -> set[str]:
    cached = getattr(catalog, "_palr_tag_words", None)
    if cached is None:
        cached = {w for i in range(len(catalog)) for t in catalog.tags(i) for w in _words(t)}
        try:
            catalog._palr_tag_words = cached  # type: ignore[attr-defined]
        except AttributeError:  # a frozen catalogue: recompute next time
            pass
    return cached


def grounded_keywords(keywords: Sequence[str], catalog: Catalog, history: Sequence[int]) -> tuple[list[str], list[str]]:
    """(kept, dropped): a keyword is kept when one of its content words is a word of the history's titles or
    attributes (or its decades) and none of them is a catalogue attribute the history lacks."""
    vocab = _history_vocab(catalog, history)
    tags = _catalog_tags(catalog)
    kept, dropped = [], []
    for k in keywords:
        content = [w for w in _words(k) if w not in _GENERIC]
        grounded = any(_match(w, vocab) for w in content)
        invented = any(w in tags and not _match(w, vocab) for w in content)
        (kept if grounded and not invented else dropped).append(k)
    return kept, dropped


def _check_answer(answer: str, prompt: str, max_chars: int, max_keywords: int, catalog: Catalog,
                  history: Sequence[int]) -> tuple[list[str], str | None, list[str]]:
    """(keywords, None, dropped) for a usable answer, else ([], reason, dropped).

    Small models often write more keywords than asked, or a few that the history does not support: the answer is
    trimmed to its first ``max_keywords`` grounded keywords rather than thrown away."""
    text = answer.strip().strip('"').split("\n")[0].strip()
    if not text:
        return [], "empty answer", []
    low = " ".join(text.lower().split())
    if len(low) >= 12 and low in " ".join(prompt.lower().split()) and "," not in low:
        return [], "answer echoes the prompt", []
    keywords = [clean_text(k).strip(" .'*-") for k in re.split(r"[,;]", text[: 4 * max_chars])]
    keywords = [k for k in dict.fromkeys(keywords) if k]
    words_ok = [k for k in keywords if len(k.split()) <= 6 and sum(ch.isalnum() for ch in k) >= max(2, len(k) // 2)]
    kept, dropped = grounded_keywords(words_ok, catalog, history)
    dropped += [k for k in keywords if k not in words_ok]
    kept = kept[:max_keywords]
    if not kept:
        why = f"no grounded keyword in {len(keywords)}" + (f" (e.g. {keywords[0][:40]!r})" if keywords else "")
        return [], why, dropped
    return kept, None, dropped


class LLMProfiler:
    """Profiles written by an LLM from ``profile_prompt``; the attribute profile whenever that fails.

    ``allow_fallback=False``: an unreachable server stops (LLMUnavailable) instead of falling back per user.
    ``self.failures`` counts users whose answer failed or was unusable.
    """

    def __init__(self, llm: LLM, fallback: AttributeProfiler | None = None, *, n_keywords: int = 5,
                 max_new_tokens: int = 48, max_chars: int = 200, batch_size: int = 16,
                 allow_fallback: bool = True) -> None:
        self.llm = llm
        self.fallback = fallback or AttributeProfiler()
        self.n_keywords, self.max_new_tokens, self.max_chars = n_keywords, max_new_tokens, max_chars
        self.batch_size = batch_size
        self.allow_fallback = allow_fallback
        self.failures = 0
        self.name = f"llm:{getattr(llm, 'name', type(llm).__name__)}"

    def _fallback(self, user: str, history: Sequence[int], catalog: Catalog, why: str) -> Profile:
        self.failures += 1
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
            except LLMUnavailable:
                if not self.allow_fallback:
                    raise
                out.extend(self._fallback(u, h, catalog, "LLM unreachable") for u, h in zip(us, hs))
                continue
            except Exception as e:  # noqa: BLE001 - any backend failure falls back, and says so
                log.warning("LLM profiler failed (%s: %s); using attribute profiles", type(e).__name__, e)
                out.extend(self._fallback(u, h, catalog, f"{type(e).__name__}: {e}") for u, h in zip(us, hs))
                continue
            for u, h, prompt, answer in zip(us, hs, prompts, answers):
                keywords, why, dropped = _check_answer(answer, prompt, self.max_chars, self.n_keywords, catalog, h)
                if why:
                    out.append(self._fallback(u, h, catalog, why))
                    continue
                note = f"dropped ungrounded or extra keywords: {', '.join(dropped[:5])}" if dropped else None
                out.append(Profile(str(u), ", ".join(keywords), "llm", keywords, backend=self.name,
                                   history_hash=history_hash(catalog, h), n_history=len(h), note=note))
        return out


class ProfileCache:
    """SQLite cache of profiles keyed by (dataset, user, history hash, backend, prompt version).

    Usable from any thread (a run is loaded in one thread and ranks in the service's worker threads): one
    connection opened with ``check_same_thread=False``, every use of it under a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS profiles (dataset TEXT, user TEXT, history_hash TEXT, "
                         "backend TEXT, prompt_version TEXT, profile TEXT, "
                         "PRIMARY KEY (dataset, user, history_hash, backend, prompt_version))")
        self._db.commit()
        self.hits = self.misses = 0

    def get(self, dataset: str, user: str, hhash: str, backend: str) -> Profile | None:
        with self._lock:
            row = self._db.execute("SELECT profile FROM profiles WHERE dataset=? AND user=? AND history_hash=? "
                                   "AND backend=? AND prompt_version=?",
                                   (dataset, user, hhash, backend, PROMPT_VERSION)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return Profile(**json.loads(row[0]))

    def put(self, dataset: str, backend: str, profiles: Sequence[Profile]) -> None:
        rows = [(dataset, p.user, p.history_hash, backend, p.prompt_version, json.dumps(p.to_dict()))
                for p in profiles]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.commit()

    def close(self) -> None:
        with self._lock:
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
    if progress_enabled(progress) and todo:
        from tqdm.auto import tqdm

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


def make_profiler(llm: str | None = None, *, spec: str | None = None, ranking_llm: LLM | None = None,
                  allow_fallback: bool = True, **llm_options: Any) -> Profiler:
    """A profiler from a spec: ``attributes``; ``llm`` (the ranking LLM, ``ranking_llm``); ``llm:SPEC`` or, as
    ``llm=SPEC``, an LLM spec for :func:`palr.llm.base.load_llm`."""
    spec = spec or (f"llm:{llm}" if llm else "attributes")
    if spec == "attributes":
        return AttributeProfiler()
    if spec == "llm":
        if ranking_llm is None:
            raise PalrError("profiler 'llm' needs the ranking LLM (give --llm), or name one: llm:SPEC")
        return LLMProfiler(ranking_llm, allow_fallback=allow_fallback)
    if spec.startswith("llm:"):

        return LLMProfiler(load_llm(spec[4:], **llm_options), allow_fallback=allow_fallback)
    raise PalrError(f"unknown profiler {spec!r}; use attributes, llm (the ranking LLM) or llm:SPEC")


MEMO_SIZE = 50_000  # profiles HistoryProfiles keeps in memory (least recently used dropped first)


class HistoryProfiles:
    """history -> profile text, as ranking and fine-tuning read it: one profiler, generated once per distinct
    history (an optional SQLite cache keeps them across runs). ``enabled=False`` gives ``None`` (no profile).

    The in-memory memo keeps the ``memo_size`` most recently used profiles (a service sees ever new histories:
    unbounded, it grew with every request); safe to call from several threads."""

    def __init__(self, dataset_name: str, catalog: Catalog, profiler: Profiler, cache: ProfileCache | None = None,
                 enabled: bool = True, memo_size: int = MEMO_SIZE,
                 user_attributes: Sequence[dict[str, Any]] | None = None) -> None:
        if memo_size < 1:
            raise ValueError(f"memo_size must be at least 1, got {memo_size}")
        self.dataset_name, self.catalog, self.profiler, self.cache, self.enabled = (
            dataset_name, catalog, profiler, cache, enabled)
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Profile] = OrderedDict()
        self._lock = threading.Lock()
        # per user row of the data set (ml-100k: age, gender, occupation): a known user's profile ends with them
        self.user_attributes = list(user_attributes) if user_attributes else None
        self.llm_profiles = self.fallbacks = 0

    def _recall(self, hh: str) -> Profile | None:
        with self._lock:
            p = self._memo.get(hh)
            if p is not None:
                self._memo.move_to_end(hh)
            return p

    def _remember(self, hh: str, p: Profile) -> None:
        with self._lock:
            self._memo[hh] = p
            self._memo.move_to_end(hh)
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)

    @property
    def name(self) -> str:
        return self.profiler.name if self.enabled else "none"

    def profiles(self, histories: Sequence[Sequence[int]]) -> list[Profile | None]:
        if not self.enabled:
            return [None] * len(histories)
        hashes = [history_hash(self.catalog, h) for h in histories]
        found: dict[str, Profile] = {}  # this call's answers: the memo may drop some while it runs
        todo: dict[str, Sequence[int]] = {}
        for hh, h in zip(hashes, histories):
            if hh in found or hh in todo:
                continue
            got = self._recall(hh)
            if got is None and self.cache is not None:
                got = self.cache.get(self.dataset_name, "-", hh, self.profiler.name)
                if got is not None:
                    self._remember(hh, got)
            if got is not None:
                found[hh] = got
            else:
                todo[hh] = h
        if todo:
            made = self.profiler.profile_many(["-"] * len(todo), list(todo.values()), self.catalog)
            for hh, p in zip(todo, made):
                found[hh] = p
                self._remember(hh, p)
                with self._lock:
                    if p.source == "llm":
                        self.llm_profiles += 1
                    elif p.note and p.backend != "attributes":
                        self.fallbacks += 1
            if self.cache is not None:
                self.cache.put(self.dataset_name, self.profiler.name, made)
        return [found[hh] for hh in hashes]

    def texts(self, histories: Sequence[Sequence[int]], users: Sequence[int] | None = None) -> list[str | None]:
        """Profile texts; with ``users`` (rows of the data set, -1 or None = unknown) and user attributes in the
        data, each known user's text ends with "; user (...)" (:func:`user_attribute_text`)."""
        out = [p.profile if p is not None else None for p in self.profiles(histories)]
        if users is None or not self.user_attributes:
            return out
        for k, u in enumerate(users):
            if out[k] is not None and u is not None and 0 <= int(u) < len(self.user_attributes):
                extra = user_attribute_text(self.user_attributes[int(u)])
                if extra:
                    out[k] = f"{out[k]}; {extra}"
        return out

    def __call__(self, history: Sequence[int], user: int | None = None) -> str | None:
        return self.texts([history], None if user is None else [user])[0]


USER_ATTRIBUTE_ORDER = ("age", "gender", "occupation")  # first, in this order; other short attributes follow
USER_ATTRIBUTE_SKIP = ("zip", "zip_code", "zipcode", "postcode")  # identifying, not a taste


def user_attribute_text(attrs: dict[str, Any] | None) -> str:
    """``{"age": 24, "gender": "M", "occupation": "technician"}`` -> ``"user (age 24, male, technician)"``
    ("" without attributes). Values longer than 40 characters and zip codes are left out."""
    if not attrs:
        return ""
    keys = [k for k in USER_ATTRIBUTE_ORDER if k in attrs] + sorted(
        k for k in attrs if k not in USER_ATTRIBUTE_ORDER and k.lower() not in USER_ATTRIBUTE_SKIP)
    parts = []
    for k in keys:
        v = attrs[k]
        if v is None or str(v).strip() == "" or len(str(v)) > 40:
            continue
        if k == "gender" and str(v).upper() in ("M", "F"):
            parts.append("male" if str(v).upper() == "M" else "female")
        elif k == "age":
            parts.append(f"age {v}")
        elif k == "occupation":
            parts.append(clean_text(str(v)).lower())
        else:
            parts.append(f"{k} {clean_text(str(v))}")
    return "user (" + ", ".join(parts) + ")" if parts else ""  # no colon: prompts turn "x:" markers into "x -"


def profile_dataset(dataset: Dataset, users: Sequence[str] | None = None, *, llm: str | None = None,
                    cache: str | Path | None = None, stage: str = "all", progress: bool = False,
                    allow_fallback: bool = True) -> list[Profile]:
    """Profiles of ``users`` (all users when None) of a loaded data set: what ``palr profile`` prints."""
    wanted = list(dataset.user_ids) if users is None else [str(u) for u in users]
    for u in wanted:
        user_history(dataset, u, stage)  # unknown users fail before any model is loaded
    store = ProfileCache(cache) if cache else None
    try:
        profiler = make_profiler(llm, allow_fallback=allow_fallback)
        if isinstance(profiler, AttributeProfiler) and dataset.user_attributes:
            profiler.user_attributes = dict(zip(dataset.user_ids, dataset.user_attributes))
        return profile_users(dataset, wanted, profiler, stage=stage, cache=store, progress=progress)
    finally:
        if store is not None:
            store.close()
