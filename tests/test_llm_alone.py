"""Issue 17 point 3: rank evidence in token prompts and training lists that look like test lists."""

from __future__ import annotations

import re

import numpy as np
import pytest

from palr.core.settings import ExampleConfig
from palr.core.topk import top_k
from palr.data import Split
from palr.llm.prompts import RANK_BOUNDS, PromptBuilder, rank_bucket
from palr.rank.llm_ranker import RankingConfig
from palr.rank.trees import split_users
from palr.retrieval.base import make_retriever
from palr.retrieval.candidates import candidates_for
from palr.train.examples import attach_candidates, check_no_leak, genuine_contexts, training_contexts


def _listed(prompt: str) -> list[tuple[int, int]]:
    """(bucket, item) pairs of a rank-evidence prompt's candidate line."""
    line = next(x for x in prompt.split("\n") if x.startswith("The candidates are "))
    return [(int(b), int(i)) for b, i in re.findall(r"<c(\d+)><i(\d+)>", line)]


def test_rank_bucket_is_monotone_and_bounded() -> None:
    buckets = [rank_bucket(r) for r in range(1, 80)]
    assert buckets[0] == 0 and buckets == sorted(buckets)
    assert rank_bucket(RANK_BOUNDS[-1]) == len(RANK_BOUNDS) - 1 and rank_bucket(10**6) == len(RANK_BOUNDS)
    assert [rank_bucket(r) for r in (1, 2, 5, 6, 7, 8, 10, 11, 50, 51)] == [0, 1, 4, 5, 5, 6, 6, 7, 10, 11]


def test_default_token_prompt_unchanged(synth_split: Split) -> None:
    cat = synth_split.dataset.catalog
    a = PromptBuilder(cat, "tokens").prompt("verbalizer", [3, 4], None, [7, 1, 2])
    assert a == ("Choose the next of the candidate movies based on user's watching history.\n"
                 "Input: User watched movies <i3><i4>.\nThe candidates are <i7><i1><i2>.\nOutput:")
    assert PromptBuilder(cat, "tokens", evidence="none").prompt("verbalizer", [3, 4], None, [7, 1, 2],
                                                                ranks=[9, 8, 7]) == a
    assert RankingConfig().evidence == "none" and ExampleConfig().evidence == "none"
    assert ExampleConfig().lists == "hard"
    with pytest.raises(ValueError, match="tokens style"):
        PromptBuilder(cat, "text", evidence="rank")


def test_rank_evidence_at_ranking_time_is_the_retriever_rank(synth_split: Split) -> None:
    """Ranking prompts get the candidates in the retriever's order: each one's bucket is that of its rank."""
    ret = make_retriever("itemknn").fit(synth_split.train, synth_split.n_items)
    ranked, _ = candidates_for(ret, synth_split, "test", 30)
    b = PromptBuilder(synth_split.dataset.catalog, "tokens", evidence="rank")
    for u in (0, 5, 17):
        pairs = _listed(b.prompt("verbalizer", synth_split.histories("test")[u], None, ranked[u]))
        assert [i for _, i in pairs] == ranked[u].tolist()
        assert [bk for bk, _ in pairs] == [rank_bucket(k + 1) for k in range(30)]


def test_hard_lists_with_rank_evidence_carry_the_retrievers_full_rank(synth_split: Split) -> None:
    cfg = ExampleConfig(positions_per_user=3, n_candidates=20, evidence="rank", seed=2)
    ret = make_retriever("itemknn").fit(synth_split.train, synth_split.n_items)
    ex = attach_candidates(training_contexts(synth_split, cfg), synth_split, ret, cfg)
    assert ex
    b = PromptBuilder(synth_split.dataset.catalog, "tokens", evidence="rank")
    for e in ex[:25]:
        full, _ = top_k(ret.score([e.history]), [e.history], synth_split.n_items - len(set(e.history.tolist())))
        pos = {int(i): k + 1 for k, i in enumerate(full[0])}
        assert e.ranks is not None and list(e.ranks) == sorted(e.ranks)  # listed best first
        for c, r in zip(e.candidates, e.ranks):  # the rank is the retriever's (ties may swap neighbours)
            assert abs(pos[int(c)] - int(r)) <= np.sum(ret.score([e.history])[0] == ret.score([e.history])[0][c])
        pairs = _listed(b.prompt("verbalizer", e.history, None, e.candidates, ranks=e.ranks))
        assert [bk for bk, _ in pairs] == [rank_bucket(r) for r in e.ranks]


def test_retriever_lists_look_like_test_lists_and_never_leak(synth_split: Split) -> None:
    cfg = ExampleConfig(positions_per_user=4, n_candidates=20, lists="retriever", evidence="rank", seed=1)
    ret = make_retriever("itemknn").fit(synth_split.train, synth_split.n_items)
    ctx = training_contexts(synth_split, cfg)
    ex = attach_candidates(ctx, synth_split, ret, cfg)
    assert 0 < len(ex) < len(ctx)  # prefixes whose target the retriever missed are dropped
    check_no_leak(ex, synth_split)
    for e in ex[:40]:
        fut = {int(synth_split.valid_targets[e.user]), int(synth_split.test_targets[e.user])}
        assert e.targets[0] in e.candidates and not fut & set(e.candidates.tolist())
        top, _ = top_k(ret.score([e.history]), [e.history], 22)
        assert e.candidates.tolist() == [int(i) for i in top[0] if int(i) not in fut][:20]  # the retriever's order
        assert e.ranks.tolist() == list(range(1, 21))


def test_genuine_lists_in_retriever_order_drop_missed_users_and_held_out_users(synth_split: Split) -> None:
    ret = make_retriever("itemknn").fit(synth_split.train, synth_split.n_items)
    ranked, _ = candidates_for(ret, synth_split, "valid", 21)
    fit_u, held = split_users(len(synth_split.train), 0.2, seed=0)
    ex = genuine_contexts(synth_split, fit_u, ranked, 20, retrieved_only=True)
    check_no_leak(ex, synth_split, held)
    assert ex and {e.user for e in ex} <= set(fit_u.tolist()) and not {e.user for e in ex} & set(held.tolist())
    for e in ex:
        test = int(synth_split.test_targets[e.user])
        assert e.targets[0] in e.candidates and test not in e.candidates
        assert e.candidates.tolist() == [int(c) for c in ranked[e.user] if int(c) != test][:20]
        assert e.ranks.tolist() == list(range(1, 21))
    listed = {int(u): [c for c in ranked[u] if c != synth_split.test_targets[u]][:20] for u in fit_u}
    kept = [u for u in fit_u if synth_split.valid_targets[u] in listed[int(u)]]
    assert [e.user for e in ex] == [int(u) for u in kept] and len(kept) < len(fit_u)


def test_a_run_fine_tuned_with_rank_evidence_ranks_with_it(tmp_path) -> None:
    """End to end on a tiny ml-100k-format set: the run records the evidence, ranks with the same prompts, and
    keeps the held-out users' per-user ranks (LLM alone, retriever alone, fused) for paired CIs."""
    pytest.importorskip("transformers")
    import json

    from tiny_runs import write_fake_ml100k

    from palr.core.metrics import ndcg
    from palr.core.settings import FinetuneConfig, MiniConfig
    from palr.rank.pipeline import PALR
    from palr.train.finetune import finetune
    from palr.train.retriever import train_run

    data_dir = write_fake_ml100k(tmp_path / "data")
    rrun = train_run("ml-100k", "sasrec", tmp_path / "retriever", params={"epochs": 2, "hidden": 16, "max_len": 50},
                     data_dir=data_dir, progress=False)
    cfg = FinetuneConfig(epochs=1.0, valid_users=40, batch_size=16, mini=MiniConfig(vocab=300, dim=32, layers=1),
                         pretrain_epochs=0, feature_ranker=False,
                         examples=ExampleConfig(positions_per_user=3, n_candidates=20, lists="retriever",
                                                evidence="rank", source="both"))
    run = finetune(rrun, tmp_path / "palr", cfg, data_dir=data_dir, progress=False)
    assert json.loads((run / "ranking.json").read_text())["evidence"] == "rank"
    first = json.loads((run / "instructions.jsonl").read_text().splitlines()[0])
    assert re.search(r"<c0><i\d+><c1><i\d+>", first["input"])  # listed best first, with their rank buckets
    palr = PALR.load(run, data_dir=data_dir)
    assert palr.ranker.builder.evidence == "rank"
    held = np.load(run / "held_out_ranks.npz")
    _, held_out = split_users(len(palr.split.train), cfg.holdout, cfg.seed)
    assert set(held["users"].tolist()) <= set(held_out.tolist()) and len(held["llm"]) == len(held["users"])
    m = json.loads((run / "metrics.json").read_text())["valid"]
    assert ndcg(held["llm"], 10) == pytest.approx(m["ndcg@10_llm"])
    assert ndcg(held["retriever"], 10) == pytest.approx(m["ndcg@10_retriever"])


def test_list_noise_blurs_the_retriever_lists_of_training_prefixes(synth_split: Split) -> None:
    ret = make_retriever("itemknn").fit(synth_split.train, synth_split.n_items)
    base = ExampleConfig(positions_per_user=4, n_candidates=20, lists="retriever", evidence="rank", seed=1)
    noisy = ExampleConfig(positions_per_user=4, n_candidates=20, lists="retriever", evidence="rank", seed=1,
                          list_noise=1.0)
    a = attach_candidates(training_contexts(synth_split, base), synth_split, ret, base)
    b = attach_candidates(training_contexts(synth_split, noisy), synth_split, ret, noisy)
    b2 = attach_candidates(training_contexts(synth_split, noisy), synth_split, ret, noisy)
    assert [e.candidates.tolist() for e in b] == [e.candidates.tolist() for e in b2]  # seeded
    assert [e.candidates.tolist() for e in a] != [e.candidates.tolist() for e in b]
    check_no_leak(b, synth_split)
    assert all(e.targets[0] in e.candidates and e.ranks.tolist() == list(range(1, 21)) for e in b)
    with pytest.raises(Exception, match="list-noise"):
        ExampleConfig(list_noise=-1.0)
