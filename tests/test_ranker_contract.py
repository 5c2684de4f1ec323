"""The ranker contract (like implicit's ``TestRecommenderBaseMixin``), run for every ranker and LLM backend.

Every :class:`palr.rank.protocol.Ranker` gives a permutation of each row's candidates; a row whose LLM fails keeps
the ranker's fallback order (the retriever's for the LLM ranker, the trees' for the fused one); a batch equals its
rows ranked one at a time; a call's notes belong to that call; threads sharing one ranker get their own results.

Failures are planted through the profile: an LLM wrapped in :class:`Flaky` gives no usable score (or raises) for
prompts that hold ``MARKER``, so which rows fail does not depend on how the rows are batched.
"""

# ruff: noqa: F811 - pytest fixtures imported from conftest_llm are redefined as arguments
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest_llm import tiny_dir, tiny_llm  # noqa: F401 - fixtures

from palr.core.errors import LLMRequestFailed, LLMUnavailable
from palr.data import Split
from palr.llm.prompts import PromptBuilder
from palr.rank.fusion import FusedRanker
from palr.rank.llm_ranker import LLMRanker
from palr.rank.protocol import LLM, TREES, Ranker, RankResult

pytest.importorskip("transformers")
pytest.importorskip("lightgbm")

MARKER = "MARKER"
B, N = 6, 10
FAILING = (1, 4)  # rows whose profile holds the marker


class Flaky:
    """An LLM whose prompts holding MARKER score NaN (no usable score), or raise ``error`` when one is given."""

    def __init__(self, llm: Any, error: type[Exception] | None = None) -> None:
        self._llm, self._error = llm, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def _spoil(self, prompts: list[str], out: Any) -> np.ndarray:
        bad = np.array([MARKER in p for p in prompts])
        out = np.array(out, dtype=np.float32)
        out[bad] = np.nan
        return out

    def _check(self, prompts: list[str]) -> None:
        if self._error is not None and any(MARKER in p for p in prompts):
            raise self._error("planted failure")

    def score_choices(self, prompts: list[str], labels: list[str]) -> np.ndarray:
        self._check(prompts)
        return self._spoil(prompts, self._llm.score_choices(prompts, labels))

    def next_token_logprobs(self, prompts: list[str]) -> np.ndarray:
        self._check(prompts)
        return self._spoil(prompts, self._llm.next_token_logprobs(prompts))


@dataclass
class Inputs:
    histories: list[np.ndarray]
    profiles: list[str | None]
    candidates: np.ndarray  # (B, N) retriever order
    scores: np.ndarray  # (B, N) the retriever's, descending
    users: np.ndarray

    def rows(self, idx: Any) -> tuple[list[np.ndarray], list[str | None], np.ndarray, np.ndarray, np.ndarray]:
        idx = np.atleast_1d(np.arange(B)[idx])
        return ([self.histories[i] for i in idx], [self.profiles[i] for i in idx], self.candidates[idx],
                self.scores[idx], self.users[idx])


def make_inputs(n_items: int, seed: int = 0, failing: tuple[int, ...] = FAILING) -> Inputs:
    """Histories from the first 20 items, candidates from the next 30 (never in a history)."""
    rng = np.random.default_rng(seed)
    hist = [rng.choice(20, size=5, replace=False).astype(np.int64) for _ in range(B)]
    cands = np.stack([20 + rng.choice(min(30, n_items - 20), size=N, replace=False) for _ in range(B)]).astype(np.int64)
    scores = np.tile(np.linspace(1.0, 0.0, N, dtype=np.float32), (B, 1))
    profiles = [f"likes {MARKER} films" if i in failing else ("drama, crime" if i % 2 else None) for i in range(B)]
    return Inputs(hist, profiles, cands, scores, np.arange(B) + 3 * seed)


# ---------------------------------------------------------------------------- the rankers
@pytest.fixture(scope="module")
def trees(synth_split: Split):
    from palr.rank.trees import FeatureRankerConfig, fit_feature_ranker
    from palr.retrieval.base import make_retriever
    from palr.retrieval.candidates import candidates_for

    ret = make_retriever("popularity").fit(synth_split.train, synth_split.n_items)
    valid = candidates_for(ret, synth_split, "valid", N)
    cfg = FeatureRankerConfig(n_candidates=N, holdout=0.25, text_encoder="tfidf", min_data_in_leaf=5, rounds=30)
    return fit_feature_ranker(synth_split, valid, cfg)[0]


@pytest.fixture(scope="module")
def mini_llm(synth_split: Split, tmp_path_factory: pytest.TempPathFactory):
    from palr.llm.mini import build_mini
    from palr.llm.registry import load_llm

    path = build_mini(synth_split.dataset.catalog, tmp_path_factory.mktemp("mini") / "m", vocab_size=300,
                      n_layer=1, n_embd=32, n_head=4, n_prompts=50)
    return load_llm(f"mini:{path}", device="cpu", chat="off")


@pytest.fixture(scope="module")
def served_llm(tiny_llm):
    from palr.llm.registry import load_llm
    from palr.llm.server import BackgroundServer, create_app

    with BackgroundServer(create_app(tiny_llm, model_name="tiny")) as url:
        yield load_llm(f"openai:tiny@{url}")


@pytest.fixture(scope="module")
def stacked_trees(synth_split: Split):
    """The stacked ranker's trees (with and without LLM features) fitted on planted LLM scores; no LLM attached."""
    from palr.rank.features import CandidateFeatures
    from palr.rank.stacked import fit_stacked
    from palr.rank.trees import FeatureRankerConfig, split_users
    from palr.retrieval.base import make_retriever
    from palr.retrieval.candidates import candidates_for

    ret = make_retriever("popularity").fit(synth_split.train, synth_split.n_items)
    cands, scores = candidates_for(ret, synth_split, "valid", N)
    lp = np.where(cands == synth_split.valid_targets[:, None], -1.0, -3.0).astype(np.float32)
    lp += np.random.default_rng(0).normal(0, 1, lp.shape).astype(np.float32)
    fit_u, hold_u = split_users(len(synth_split.train), 0.25, 0)
    cfg = FeatureRankerConfig(n_candidates=N, holdout=0.25, text_encoder="tfidf", min_data_in_leaf=5, rounds=30)
    return fit_stacked(synth_split, (cands, scores), cfg, fit_users=fit_u, held_out=hold_u,
                       features=CandidateFeatures().fit(synth_split, "tfidf"), llm_lp=lp)[0]


CASES = ["llm-hf", "llm-mini", "llm-openai", "trees", "fused-hf", "stacked-hf"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, synth_split: Split) -> Callable[..., Ranker]:
    """A function (error=None) -> a fresh ranker of this kind over a Flaky LLM (allow_fallback on)."""
    catalog = synth_split.dataset.catalog
    kind = request.param

    def llm_ranker(llm: Any, style: str, error: type[Exception] | None, weight: float) -> LLMRanker:
        return LLMRanker(Flaky(llm, error), PromptBuilder(catalog, style), weight=weight, batch_size=4,  # type: ignore[arg-type]
                         allow_fallback=True, retriever="pop")

    def build(error: type[Exception] | None = None) -> Ranker:
        if kind == "llm-hf":
            return llm_ranker(request.getfixturevalue("tiny_llm"), "text", error, 0.5)
        if kind == "llm-mini":
            return llm_ranker(request.getfixturevalue("mini_llm"), "tokens", error, 0.5)
        if kind == "llm-openai":
            return llm_ranker(request.getfixturevalue("served_llm"), "text", error, 0.5)
        features = request.getfixturevalue("trees")
        if kind == "trees":
            return features
        if kind == "stacked-hf":
            from palr.rank.stacked import StackedRanker

            st = request.getfixturevalue("stacked_trees")
            return StackedRanker(st.features, st.booster, llm_ranker(request.getfixturevalue("tiny_llm"), "text",
                                                                     error, 0.0), st.twin)
        return FusedRanker(llm_ranker(request.getfixturevalue("tiny_llm"), "text", error, 0.0), features, 1.0)

    build.kind = kind  # type: ignore[attr-defined]
    return build


def fallback_order(ranker: Ranker, x: Inputs, idx: Any) -> np.ndarray:
    """The order a failed row keeps: the retriever's for the LLM ranker, the trees' for the fused ranker."""
    h, p, c, s, u = x.rows(idx)
    if isinstance(ranker, FusedRanker):
        return ranker.features.rank(h, p, c, s, u).order
    without_llm = getattr(ranker, "without_llm", None)  # the stacked ranker: its twin without LLM features
    if without_llm is not None and ranker.llm_ranker is not None:
        return without_llm().rank(h, p, c, s, u).order
    return c


def same(a: RankResult, b: RankResult) -> None:
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.failed, b.failed)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    assert a.notes == b.notes and a.components == b.components


# ---------------------------------------------------------------------------- the contract
def test_the_order_is_a_permutation_of_each_rows_candidates(case, synth_split: Split) -> None:
    ranker = case()
    x = make_inputs(synth_split.n_items, failing=())
    r = ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)
    assert isinstance(ranker, Ranker) and r.order.shape == r.scores.shape == x.candidates.shape
    for row, cands in zip(r.order, x.candidates):
        assert sorted(row.tolist()) == sorted(cands.tolist())
    assert (np.diff(r.scores, axis=1) <= 1e-9).all()  # best first
    assert r.candidate_scores is not None and r.candidate_scores.shape == x.candidates.shape
    assert not r.failed.any() and r.notes == []
    assert r.components == ranker.components and r.ranked_by(0) == " + ".join(ranker.components)
    assert (LLM in r.components) == bool(np.isfinite(r.llm_logprobs).any())  # the LLM counts only where asked


def test_failed_rows_keep_the_fallback_order(case, synth_split: Split) -> None:
    ranker = case()
    x = make_inputs(synth_split.n_items)
    r = ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)
    if case.kind == "trees":  # no LLM: nothing fails
        assert not r.failed.any() and r.notes == []
        return
    assert r.failed.tolist() == [i in FAILING for i in range(B)] and r.notes
    np.testing.assert_array_equal(r.order[list(FAILING)], fallback_order(ranker, x, list(FAILING)))
    assert "LLM failed" in r.ranked_by(FAILING[0]) and LLM not in r.consulted(FAILING[0])
    healthy = [i for i in range(B) if i not in FAILING]
    alone = ranker.rank(*x.rows(healthy))
    np.testing.assert_array_equal(r.order[healthy], alone.order)
    # a backend failure (unreachable, or a failed request) fails the call: every row keeps the fallback order
    for error in (LLMUnavailable, LLMRequestFailed):
        broken = case(error)
        r = broken.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)
        assert r.failed.all() and any("stands" in n for n in r.notes)
        np.testing.assert_array_equal(r.order, fallback_order(broken, x, slice(None)))


def test_a_batch_equals_its_rows_one_at_a_time(case, synth_split: Split) -> None:
    ranker = case()
    x = make_inputs(synth_split.n_items, seed=1)
    batch = ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)
    for i in range(B):
        one = ranker.rank(*x.rows([i]))
        np.testing.assert_array_equal(one.order[0], batch.order[i])
        np.testing.assert_allclose(one.scores[0], batch.scores[i], rtol=1e-4, atol=1e-4)
        assert one.failed[0] == batch.failed[i]


def test_notes_belong_to_one_call(case, synth_split: Split) -> None:
    ranker = case()
    x = make_inputs(synth_split.n_items)
    bad = ranker.rank(*x.rows(list(FAILING)))
    kept = list(bad.notes)
    good = ranker.rank(*x.rows([0, 2]))
    assert good.notes == [] and bad.notes == kept  # the next call neither sees nor changes them
    assert not any(k.startswith("_notes") for k in vars(ranker))  # nothing per call on the ranker
    if case.kind != "trees":
        assert kept


def test_threads_sharing_a_ranker_get_their_own_results(case, synth_split: Split) -> None:
    ranker = case()
    inputs = [make_inputs(synth_split.n_items, seed=s, failing=FAILING if s % 2 else ()) for s in range(6)]
    expected = [ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users) for x in inputs]
    before = ranker.failed_users
    jobs = [inputs[j % len(inputs)] for j in range(18)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda x: ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users), jobs))
    for j, r in enumerate(got):
        same(r, expected[j % len(inputs)])
    assert ranker.failed_users - before == sum(int(r.failed.sum()) for r in got)


# ---------------------------------------------------------------------------- bugs are not failures of the LLM
@pytest.mark.parametrize("kind", ["llm", "fused"])
def test_a_bug_propagates_instead_of_keeping_the_fallback_order(kind: str, tiny_llm, trees,
                                                                synth_split: Split) -> None:
    """Before: ``except Exception`` turned any bug into "the retriever's order stands"."""
    llm = LLMRanker(Flaky(tiny_llm, TypeError), PromptBuilder(synth_split.dataset.catalog, "text"), weight=0.5,
                    allow_fallback=True)
    ranker: Ranker = llm if kind == "llm" else FusedRanker(llm, trees, 1.0)
    x = make_inputs(synth_split.n_items)
    with pytest.raises(TypeError, match="planted"):
        ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)
    assert ranker.failed_users == 0


def test_a_backend_failure_stops_unless_fallback_is_allowed(tiny_llm, trees, synth_split: Split) -> None:
    x = make_inputs(synth_split.n_items)
    for error in (LLMUnavailable, LLMRequestFailed):
        llm = LLMRanker(Flaky(tiny_llm, error), PromptBuilder(synth_split.dataset.catalog, "text"), weight=0.5)
        assert llm.allow_fallback is False  # the default
        for ranker in (llm, FusedRanker(llm, trees, 1.0)):
            with pytest.raises(error):
                ranker.rank(x.histories, x.profiles, x.candidates, x.scores, x.users)


def test_allow_fallback_is_off_by_default_everywhere() -> None:
    """Before: True in PALR.load and create_app/serve, False on the command line."""
    import inspect

    from palr.core.settings import EvaluateConfig
    from palr.evaluate.palr import evaluate_palr_run
    from palr.rank.factory import RankOptions
    from palr.serve.app import create_app, serve

    assert RankOptions().allow_fallback is False and EvaluateConfig(run=Path("r")).allow_fallback is False
    for fn in (create_app, serve, evaluate_palr_run, LLMRanker.__init__):
        assert inspect.signature(fn).parameters["allow_fallback"].default is False, fn


def test_an_unreachable_llm_stops_a_default_load(tmp_path: Path) -> None:
    from palr.data.synthetic import synthetic_raw
    from palr.rank.pipeline import PALR
    from palr.train.retriever import train_run

    raw = synthetic_raw(40, 30, seed=3)
    lines = ["user,item,timestamp"] + [f"{u},{i},{int(t)}" for u, i, t in zip(raw.users, raw.items, raw.times)]
    (tmp_path / "inter.csv").write_text("\n".join(lines) + "\n")
    run = train_run(f"csv:{tmp_path / 'inter.csv'}", "itemknn", tmp_path / "retr", progress=False)
    palr = PALR.load(run, llm="openai:m@http://127.0.0.1:9/v1?max_retries=0")
    with pytest.raises(LLMUnavailable):
        palr.recommend(user=palr.split.dataset.user_ids[0], k=3)
    # no LLM to write the order of: --llm-predictions over a retriever run without --llm is refused
    from typer.testing import CliRunner

    from palr.cli.main import app
    from palr.core.errors import PalrError

    res = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--llm-predictions", str(tmp_path / "l.jsonl")])
    assert isinstance(res.exception, PalrError) and "--llm-predictions" in str(res.exception)


# ---------------------------------------------------------------------------- labels: what ranked
def test_a_run_whose_llm_is_unused_says_so_everywhere(tiny_ml100k_run: dict[str, Path], tmp_path: Path) -> None:
    """A fused run whose LLM weight is 0: results.json, the console and the API name the trees alone, and
    --llm-predictions still writes the LLM's own order with its row in the table."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from palr.cli.main import app
    from palr.serve.app import create_app

    run = tmp_path / "run"
    shutil.copytree(tiny_ml100k_run["palr"], run)
    ranking = json.loads((run / "ranking.json").read_text())
    ranking["features"] = {"dir": "feature_ranker", "weight": 0.0}
    (run / "ranking.json").write_text(json.dumps(ranking))
    unused = "trees (LLM unused: weight 0 on held-out users)"
    res = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--data-dir", str(tiny_ml100k_run["data_dir"]),
                                   "--users", "15", "--out", str(tmp_path / "r.json"),
                                   "--predictions", str(tmp_path / "p.jsonl"),
                                   "--llm-predictions", str(tmp_path / "llm.jsonl")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # the console may wrap long lines
    assert f"PALR ranked by: {unused}" in out and f"PALR: {unused}" in out, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["protocol"]["ranked_by"] == unused and doc["protocol"]["consulted"] == [TREES]
    assert doc["ranked_by"]["PALR (end to end)"] == f"PALR: {unused}"
    assert "LLM alone (end to end)" in doc["results"] and "LLM alone (end to end)" in doc["ranked_by"]
    llm_lines = (tmp_path / "llm.jsonl").read_text().splitlines()
    assert len(llm_lines) == 15 and (tmp_path / "p.jsonl").read_text().splitlines() != llm_lines
    with TestClient(create_app(run, tiny_ml100k_run["data_dir"])) as client:
        user = client.get("/users").json()["users"][0]
        body = client.post("/recommend", json={"user": user, "k": 3}).json()
    assert body["llm"]["ranked_by"] == TREES and body["llm"]["consulted"] == [TREES]
    assert body["llm"]["ranker"] == unused


def test_labels_list_only_what_orders_the_lists(trees, synth_split: Split) -> None:
    builder = PromptBuilder(synth_split.dataset.catalog, "text")
    assert LLMRanker(None, builder, weight=0.0, retriever="sasrec").label == "LLM"
    assert LLMRanker(None, builder, weight=0.5, retriever="sasrec").label == "LLM + sasrec rank"
    assert LLMRanker(None, builder, weight=0.5, fusion="score", retriever="sasrec").components == (LLM, "sasrec score")
    inf = LLMRanker(None, builder, weight=float("inf"), retriever="sasrec", chosen_on="validation users")
    assert inf.label == "sasrec order (LLM unused: weight inf on validation users)" and LLM not in inf.components
    x = make_inputs(synth_split.n_items)
    r = inf.rank(x.histories, x.profiles, x.candidates, x.scores)  # the LLM (None here) is not asked
    np.testing.assert_array_equal(r.order, x.candidates)
    assert np.isnan(r.llm_logprobs).all() and r.ranked_by(0) == "sasrec order"
    llm = LLMRanker(None, builder)
    assert FusedRanker(llm, trees, 0.3).label == "trees + LLM"
    assert FusedRanker(llm, trees, 0.0, chosen_on="held-out users").label == \
        "trees (LLM unused: weight 0 on held-out users)"
    assert trees.label == "trees" and trees.llm_ranker is None
