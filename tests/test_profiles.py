"""Profiles: attribute summaries, LLM profiles with validation and fallback, the SQLite cache, the CLI path."""

# ruff: noqa: F811 - pytest fixtures imported from conftest_llm are redefined as arguments
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest_llm import tiny_catalog, tiny_dir, tiny_llm  # noqa: F401 - fixtures

from palr.core.errors import PalrError
from palr.data.dataset import Dataset
from palr.rank.profiles import AttributeProfiler, LLMProfiler, ProfileCache, profile_users, user_history


class FixedLLM:
    """A model that answers every prompt with the same text (or raises), to test validation."""

    def __init__(self, answer: str | Exception) -> None:
        self.answer, self.name, self.calls = answer, "fixed", 0

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop=None, **kw):
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return [self.answer if self.answer != "ECHO" else p[:80] for p in prompts]

    def score_choices(self, prompts, labels):  # pragma: no cover
        return np.zeros((len(prompts), len(labels)))


def dataset() -> Dataset:
    # user "u1": crime dramas, lately action; user "u2": comedies
    seqs = [np.array([2, 7, 6, 2, 7, 1], dtype=np.int64), np.array([0, 4, 0, 4, 3], dtype=np.int64)]
    return Dataset("tiny", ["u1", "u2"], seqs, tiny_catalog(), protocol={})


def test_attribute_profile_names_dominant_genre():
    ds = dataset()
    p = AttributeProfiler().profile("u1", ds.sequences[0], ds.catalog)
    assert p.source == "attributes" and p.keywords[0] in {"crime movies", "drama movies"}
    assert p.profile.startswith(p.keywords[0]) and "(83%)" in p.profile  # 5 of 6 are crime or drama
    assert "mostly 1990s films" in p.profile and "lately:" in p.profile
    q = AttributeProfiler().profile("u2", ds.sequences[1], ds.catalog)
    assert q.keywords[0] == "comedy movies" and "comedy movies (80%)" in q.profile
    d = q.to_dict()
    assert d["user"] == "u2" and d["source"] == "attributes" and isinstance(d["keywords"], list)


def test_profiles_identical_across_runs():
    ds = dataset()
    a = profile_users(ds, ["u1", "u2"], AttributeProfiler())
    b = profile_users(ds, ["u1", "u2"], AttributeProfiler())
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]


def test_unknown_user_and_stage():
    ds = dataset()
    with pytest.raises(PalrError, match="unknown user 'nobody'"):
        user_history(ds, "nobody")
    assert len(user_history(ds, "u1", "test")) == 5 and len(user_history(ds, "u1", "valid")) == 4


def test_cache_hits(tmp_path):
    ds = dataset()
    llm = FixedLLM("crime movies, 1990s thrillers")
    cache = ProfileCache(tmp_path / "p.sqlite")
    first = profile_users(ds, ["u1", "u2"], LLMProfiler(llm), cache=cache)
    assert llm.calls == 1 and cache.misses == 2 and first[0].source == "llm"
    again = profile_users(ds, ["u1", "u2"], LLMProfiler(llm), cache=ProfileCache(tmp_path / "p.sqlite"))
    assert llm.calls == 1 and [p.to_dict() for p in again] == [p.to_dict() for p in first]
    other = profile_users(ds, ["u1"], AttributeProfiler(), cache=cache)  # another backend: its own entry
    assert other[0].source == "attributes"


class CountingProfiler(AttributeProfiler):
    """The attribute profiler, counting the histories it was asked to profile."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, ...]] = []

    def profile_many(self, users, histories, catalog, **kw):
        self.asked += [tuple(int(i) for i in h) for h in histories]
        return super().profile_many(users, histories, catalog, **kw)


def test_cache_opened_in_one_thread_serves_worker_threads(tmp_path):
    """A run loads its profiles.sqlite in one thread and ranks in worker threads: sqlite3 refused that
    ('SQLite objects created in a thread can only be used in that same thread')."""
    from concurrent.futures import ThreadPoolExecutor

    from palr.rank.profiles import HistoryProfiles

    ds = dataset()
    cache = ProfileCache(tmp_path / "profiles.sqlite")  # opened here, in the main thread
    made = profile_users(ds, ["u1", "u2"], AttributeProfiler(), cache=cache)
    with ThreadPoolExecutor(4) as pool:  # the same cache, read and written from worker threads
        got = list(pool.map(lambda k: profile_users(ds, [["u1", "u2"][k % 2]], AttributeProfiler(), cache=cache)[0],
                            range(16)))
    assert [p.to_dict() for p in got] == [made[k % 2].to_dict() for k in range(16)]
    assert cache.hits == 16 and cache.misses == 2
    # HistoryProfiles over a cache, many distinct histories at once from several threads: each gets its own
    counting = CountingProfiler()
    hp = HistoryProfiles("tiny", ds.catalog, counting, cache)
    hists = [np.array([k % 8, (k + 3) % 8, (k * 5) % 8], dtype=np.int64) for k in range(40)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda h: hp(h), hists))
    assert texts == [AttributeProfiler().profile("-", h, ds.catalog).profile for h in hists]
    cache.close()


def test_history_profiles_memo_is_bounded_least_recently_used_first():
    from palr.rank.profiles import HistoryProfiles

    ds = dataset()
    counting = CountingProfiler()
    hp = HistoryProfiles("tiny", ds.catalog, counting, memo_size=2)
    a, b, c = np.array([2, 7]), np.array([0, 4]), np.array([1, 6])
    hp.texts([a, b])
    hp(a)  # a is now the most recently used; b the least
    hp(c)  # a third history: b is dropped, a and c kept
    assert len(hp._memo) == 2
    assert counting.asked == [(2, 7), (0, 4), (1, 6)]
    hp(a)
    hp(c)
    assert counting.asked == [(2, 7), (0, 4), (1, 6)]  # remembered: not profiled again
    hp(b)
    assert counting.asked[-1] == (0, 4) and len(counting.asked) == 4 and len(hp._memo) == 2  # dropped: again
    # one call with more distinct histories than the memo holds still answers every one of them
    many = [np.array([i, j]) for i in range(8) for j in range(8) if i != j][:10]
    assert hp.texts(many) == [AttributeProfiler().profile("-", h, ds.catalog).profile for h in many]
    assert len(hp._memo) == 2
    with pytest.raises(ValueError, match="memo_size"):
        HistoryProfiles("tiny", ds.catalog, counting, memo_size=0)


@pytest.mark.parametrize("answer,why", [("", "empty"), ("ECHO", "echo"), ("x" * 300, "no grounded keyword"),
                                        ("a, b, c, d, e, f, g", "no grounded keyword"),
                                        ("!!!, ???", "no grounded keyword"),
                                        ("horror movies, comedy movies", "no grounded keyword"),  # invented genres
                                        (RuntimeError("server down"), "server down")])
def test_llm_profile_falls_back(answer, why):
    ds = dataset()
    [p] = LLMProfiler(FixedLLM(answer)).profile_many(["u1"], [ds.sequences[0]], ds.catalog)
    assert p.source == "attributes" and why in p.note and "attribute profile used" in p.note
    assert p.profile == AttributeProfiler().profile("u1", ds.sequences[0], ds.catalog).profile


def test_llm_profile_accepted():
    ds = dataset()
    [p] = LLMProfiler(FixedLLM(' crime movies, dark thrillers\nmore')).profile_many(["u1"], [ds.sequences[0]],
                                                                                     ds.catalog)
    assert p.source == "llm" and p.keywords == ["crime movies", "dark thrillers"] and p.note is None


def test_llm_profile_trims_a_long_list_to_grounded_keywords():
    """A small model's over-long answer keeps its first 5 grounded keywords instead of being thrown away."""
    from palr.rank.profiles import grounded_keywords

    ds = dataset()
    answer = "crime movies, horror movies, drama, 1990s films, Heat, casino, thrillers, action, quirky stuff"
    [p] = LLMProfiler(FixedLLM(answer)).profile_many(["u1"], [ds.sequences[0]], ds.catalog)
    assert p.source == "llm" and p.keywords == ["crime movies", "drama", "1990s films", "Heat", "casino"]
    assert "horror movies" in p.note  # said what was dropped
    kept, dropped = grounded_keywords(p.keywords, ds.catalog, ds.sequences[0])
    assert kept == p.keywords and not dropped
    [p] = LLMProfiler(FixedLLM("1990s, 1980s")).profile_many(["u1"], [ds.sequences[0]], ds.catalog)
    assert p.source == "llm" and p.keywords == ["1990s"]  # a decade of the history is a keyword; 1980s is not
    # grounding is per history: u2 (comedies, adventure) has no crime
    assert grounded_keywords(["crime movies", "comedies"], ds.catalog, ds.sequences[1]) == (["comedies"], ["crime movies"])


def test_an_unreachable_llm_stops_the_profiler_unless_fallback_is_allowed():
    from palr.core.errors import LLMUnavailable

    ds = dataset()
    down = FixedLLM(LLMUnavailable("LLM server http://127.0.0.1:9/v1 unreachable"))
    with pytest.raises(LLMUnavailable):
        LLMProfiler(down, allow_fallback=False).profile_many(["u1"], [ds.sequences[0]], ds.catalog)
    prof = LLMProfiler(down)
    [p] = prof.profile_many(["u1"], [ds.sequences[0]], ds.catalog)
    assert p.source == "attributes" and "unreachable" in p.note and prof.failures == 1


def test_llm_profile_with_random_model_falls_back_or_validates(tiny_llm):
    ds = dataset()
    ps = LLMProfiler(tiny_llm, max_new_tokens=8).profile_many(["u1", "u2"], ds.sequences, ds.catalog)
    # the random model writes no keyword grounded in the history: both profiles fall back to the attribute
    # profile (the same text AttributeProfiler writes), and say why
    plain = AttributeProfiler().profile_many(["u1", "u2"], ds.sequences, ds.catalog)
    assert [p.source for p in ps] == ["attributes", "attributes"]
    assert [p.profile for p in ps] == [p.profile for p in plain] and all(p.profile for p in ps)
    assert all(p.note.startswith("LLM profile rejected (no grounded keyword") for p in ps), [p.note for p in ps]


def test_cli_profile(tmp_path):
    from typer.testing import CliRunner

    from palr.cli.main import app

    rows = ["user,item,timestamp"] + [f"u{u},i{(u + k) % 12},{k}" for u in range(12) for k in range(6)]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{tmp_path / 'x.csv'}"
    res = CliRunner().invoke(app, ["profile", "-d", spec, "--user", "u3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["user"] == "u3" and doc["source"] == "attributes" and doc["n_history"] == 6
    res = CliRunner().invoke(app, ["profile", "-d", spec, "--all", "--out", str(tmp_path / "p.jsonl"),
                                   "--cache", str(tmp_path / "c.sqlite")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 12
    res = CliRunner().invoke(app, ["profile", "-d", spec, "--user", "nobody"])
    assert isinstance(res.exception, PalrError) and "unknown user 'nobody'" in str(res.exception)
