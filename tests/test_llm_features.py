"""Issue 17 (points 2, 4, 5): candidates merged from several retrievers, the LLM's scores as features of the one
learned ranker (with its twin without them, fitted on the same lists of the same users), no test or seen target in
its fitting, user attributes in profiles and features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palr.core.errors import ConfigError
from palr.core.metrics import recall_of_candidates
from palr.data import Split
from palr.data.dataset import Dataset
from palr.rank.features import CandidateFeatures, user_attribute_matrix
from palr.rank.profiles import AttributeProfiler, HistoryProfiles, user_attribute_text
from palr.retrieval.base import make_retriever
from palr.retrieval.candidates import CandidateSources, candidates_for, parse_sources

OCCUPATIONS = ["technician", "writer", "student", "artist", "engineer"]


def sources_for(split: Split, spec: str = "itemknn:6,popularity:4", size: int = 20) -> CandidateSources:
    primary = make_retriever("itemknn", neighbours=5, sequential=False).fit(split.train, split.n_items)
    return CandidateSources.fit(split, primary, "knn5", size, spec)


def with_attributes(split: Split) -> Split:
    ds = split.dataset
    attrs = [{"age": 18 + u % 40, "gender": "MF"[u % 2], "occupation": OCCUPATIONS[u % 5], "zip": f"{10000 + u}"}
             for u in range(ds.n_users)]
    return Split(Dataset(ds.name, ds.user_ids, ds.sequences, ds.catalog, ds.protocol, attrs), split.train,
                 split.valid_targets, split.test_targets)


def test_parse_sources_checks_names_and_counts() -> None:
    assert parse_sources("") == []
    assert parse_sources("itemknn:10, popularity:5") == [("itemknn", 10), ("popularity", 5)]
    for bad in ("sasrec:5", "itemknn", "itemknn:0", "itemknn:3,itemknn:4"):
        with pytest.raises(ConfigError):
            parse_sources(bad)


def test_merged_candidates_are_deduplicated_and_keep_every_source_rank(synth_split: Split) -> None:
    src = sources_for(synth_split)
    hist = synth_split.histories("valid")[:50]
    users = np.arange(50)
    cands, scores, feats = src.merge(hist, users)
    assert cands.shape == (50, 20) and feats.shape == (50, 20, 3 * len(src.names))
    assert src.counts == {"knn5": 10, "itemknn": 6, "popularity": 4}
    for b in range(50):
        assert len(set(cands[b].tolist())) == 20  # de-duplicated, full length
        assert not set(cands[b].tolist()) & set(hist[b].tolist())  # never a history item
    # the primary's top 10 lead, in its order; its scores are returned for every candidate
    prim, _ = candidates_for(src.primary, synth_split, "valid", 20)
    np.testing.assert_array_equal(cands[:, :10], prim[:50, :10])
    full = src.primary.score(list(hist))
    np.testing.assert_allclose(scores, np.take_along_axis(full, cands, axis=1), rtol=1e-6)
    # every source's rank kept: rank r (1-based) in that source's own top-20, or the sentinel 21 with in_top 0
    for j, (name, model) in enumerate([("knn5", src.primary)] + [(n, m) for n, m, _ in src.extra]):
        top = candidates_for(model, synth_split, "valid", 20)[0][:50]
        rank, inside = feats[:, :, 3 * j + 1], feats[:, :, 3 * j + 2]
        for b in range(50):
            for k, c in enumerate(cands[b]):
                where = np.flatnonzero(top[b] == c)
                if len(where):
                    assert rank[b, k] == where[0] + 1 and inside[b, k] == 1, name
                else:
                    assert rank[b, k] == 21 and inside[b, k] == 0, name
    # describe() gives the same features for given candidates (what the ranker computes at ranking time)
    np.testing.assert_allclose(src.describe(hist, cands, users), feats, rtol=1e-6)


def test_merged_recall_is_at_least_the_weak_source_alone(synth_split: Split) -> None:
    src = sources_for(synth_split, "itemknn:8,popularity:2", size=20)
    rec = src.recall(synth_split, "valid")
    cands, _, _ = src.merged_for(synth_split, "valid")
    assert rec["merged@20"] == pytest.approx(recall_of_candidates(cands, synth_split.valid_targets))
    prim = candidates_for(src.primary, synth_split, "valid", 20)[0]
    assert rec["knn5@20"] == pytest.approx(recall_of_candidates(prim, synth_split.valid_targets))
    assert rec["merged@20"] >= rec["knn5@20"]


def test_save_and_load_keep_the_merge(synth_split: Split, tmp_path: Path) -> None:
    src = sources_for(synth_split)
    src.save(tmp_path / "s")
    back = CandidateSources.load(tmp_path / "s", src.primary)
    hist = synth_split.histories("test")[:30]
    a, b = src.merge(hist, np.arange(30)), back.merge(hist, np.arange(30))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_stacked_and_twin_fit_the_same_users_and_never_a_test_target(synth_split: Split) -> None:
    pytest.importorskip("lightgbm")
    from palr.rank.stacked import LLM_FEATURES, fit_stacked
    from palr.rank.trees import FeatureRankerConfig, split_users

    src = sources_for(synth_split)
    cands, scores, sfeats = src.merged_for(synth_split, "valid")
    feats = CandidateFeatures().fit(synth_split, "tfidf")
    fit_u, hold_u = split_users(len(synth_split.train), 0.25, 0)
    # an "LLM" that knows the validation target: its feature is perfect on every list
    lp = np.where(cands == synth_split.valid_targets[:, None], 0.0, -5.0).astype(np.float32)
    cfg = FeatureRankerConfig(n_candidates=20, holdout=0.25, rounds=30, min_data_in_leaf=5, text_encoder="tfidf")
    seen: dict[str, list[np.ndarray]] = {}
    import palr.rank.stacked as stacked_mod

    real_fit = stacked_mod.fit_trees

    def spy(X, y, Xh, yh, c, names):  # type: ignore[no-untyped-def]
        seen.setdefault("X", []).append(X)
        seen.setdefault("names", []).append(names)
        return real_fit(X, y, Xh, yh, c, names)

    stacked_mod.fit_trees = spy
    try:
        ranker, m = fit_stacked(synth_split, (cands, scores), cfg, fit_users=fit_u, held_out=hold_u, features=feats,
                                sources=src, source_feats=sfeats, llm_lp=lp, llm_ranker=object())
    finally:
        stacked_mod.fit_trees = real_fit
    twin_X, full_X = seen["X"]
    assert seen["names"][1] == seen["names"][0] + LLM_FEATURES  # the twin = the same features less the LLM's
    np.testing.assert_array_equal(full_X[..., :twin_X.shape[2]], twin_X)  # same lists, same users, same rows
    assert m["fit_lists"] == len(twin_X) and ranker.twin is not None
    assert m["holdout_ndcg@10"] > m["holdout_ndcg@10_without_llm"]  # the LLM's contribution shows
    # no test target enters fitting: changing every test item changes nothing fitted
    other = Split(synth_split.dataset, synth_split.train, synth_split.valid_targets,
                  (synth_split.test_targets + 7) % synth_split.n_items)
    _, m2 = fit_stacked(other, (cands, scores), cfg, fit_users=fit_u, held_out=hold_u, features=feats,
                        sources=src, source_feats=sfeats, llm_lp=lp, llm_ranker=object())
    assert m2["holdout_ndcg@10"] == m["holdout_ndcg@10"] and m2["rounds"] == m["rounds"]


def test_users_whose_validation_target_trained_the_llm_never_fit_the_stack(synth_split: Split) -> None:
    from palr.rank.stacked import users_with_seen_valid_targets
    from palr.train.examples import Example, genuine_contexts

    cands = candidates_for(make_retriever("popularity").fit(synth_split.train, synth_split.n_items), synth_split,
                           "valid", 11)[0]
    ex = genuine_contexts(synth_split, np.array([3, 5, 8]), cands, 10)
    ex.append(Example(9, synth_split.train[9][:-1], [int(synth_split.train[9][-1])]))  # a prefix: not seen
    np.testing.assert_array_equal(users_with_seen_valid_targets(ex, synth_split), [3, 5, 8])


def test_user_attributes_reach_profiles_and_features(synth_split: Split) -> None:
    split = with_attributes(synth_split)
    assert user_attribute_text({"age": 24, "gender": "M", "occupation": "technician", "zip": "85711"}) == \
        "user (age 24, male, technician)"
    hp = HistoryProfiles("x", split.dataset.catalog, AttributeProfiler(), user_attributes=split.dataset.user_attributes)
    plain, known = hp.texts([split.train[1]])[0], hp.texts([split.train[1]], [1])[0]
    assert plain is not None and "user (" not in plain
    assert known == f"{plain}; user (age 19, female, writer)"
    prof = AttributeProfiler(user_attributes=dict(zip(split.dataset.user_ids, split.dataset.user_attributes)))
    p = prof.profile(split.dataset.user_ids[0], split.train[0], split.dataset.catalog)
    assert p.profile.endswith("user (age 18, male, technician)")
    m, names = user_attribute_matrix(split.dataset)
    assert names == ["user_age", "user_gender=M", "user_occupation#code"]  # the zip code is no feature
    assert m[2].tolist() == [20.0, 1.0, float(sorted(OCCUPATIONS).index("student"))]


@pytest.mark.slow
def test_finetune_with_sources_and_stack_then_evaluate(tmp_path: Path) -> None:
    """The whole path on a tiny ml-100k-format set with u.user: merged candidates, the stacked ranker and its twin
    in the run, ``palr evaluate`` pairing PALR with the twin; the features run uses the same candidates."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightgbm")
    from tiny_runs import write_fake_ml100k

    from palr.core.settings import ExampleConfig, FinetuneConfig, MiniConfig
    from palr.evaluate.palr import UNUSED_STACKED_LABEL, evaluate_palr_run
    from palr.rank.pipeline import PALR
    from palr.rank.stacked import NO_LLM_LABEL, StackedRanker
    from palr.rank.trees import FeatureRankerConfig
    from palr.train.finetune import finetune
    from palr.train.retriever import train_run
    from palr.train.trees import train_feature_run

    data_dir = write_fake_ml100k(tmp_path / "data")
    (data_dir / "ml-100k" / "u.user").write_text("".join(
        f"{u}|{20 + u % 30}|{'MF'[u % 2]}|{OCCUPATIONS[u % 5]}|{10000 + u}\n" for u in range(1, 121)))
    rrun = train_run("ml-100k", "sasrec", tmp_path / "retriever", params={"epochs": 2, "hidden": 16, "max_len": 50},
                     data_dir=data_dir, progress=False)
    cfg = FinetuneConfig(epochs=1.0, valid_users=40, batch_size=16, mini=MiniConfig(vocab=300, dim=32, layers=1),
                         pretrain_epochs=1, examples=ExampleConfig(positions_per_user=2, n_candidates=20),
                         sources="itemknn:5,popularity:3", text_encoder="tfidf")
    prun = finetune(rrun, tmp_path / "palr", cfg, data_dir=data_dir, progress=False)
    ranking = json.loads((prun / "ranking.json").read_text())
    assert ranking["candidates"]["counts"] == {"sasrec": 12, "itemknn": 5, "popularity": 3}
    assert ranking["user_attributes"] is True and ranking["stacked"]["llm_features"] is True
    valid = json.loads((prun / "metrics.json").read_text())["valid"]
    st = valid["stacked"]
    assert set(st) >= {"holdout_ndcg@10", "holdout_ndcg@10_without_llm", "chosen", "compared_with"}
    assert valid["candidate_recall"]["merged@20"] >= 0
    assert (prun / "instructions.jsonl").read_text().count("user (age ") > 0  # attributes in the prompts
    # not chosen on held-out users: the run ranks otherwise, and evaluation still measures it against its twin
    ranking["stacked"]["chosen"] = False
    (prun / "ranking.json").write_text(json.dumps(ranking))
    doc0 = evaluate_palr_run(prun, data_dir=data_dir, progress=False)
    assert doc0 is not None and UNUSED_STACKED_LABEL in doc0["results"] and NO_LLM_LABEL in doc0["results"]
    assert f"{UNUSED_STACKED_LABEL} vs {NO_LLM_LABEL}" in doc0["comparisons"]
    # chosen: the stacked ranker is PALR
    ranking["stacked"]["chosen"] = True
    (prun / "ranking.json").write_text(json.dumps(ranking))
    palr = PALR.load(prun, data_dir)
    assert isinstance(palr.ranker, StackedRanker) and palr.sources is not None
    doc = evaluate_palr_run(prun, data_dir=data_dir, progress=False)
    assert doc is not None and NO_LLM_LABEL in doc["results"] and UNUSED_STACKED_LABEL not in doc["results"]
    assert f"PALR (end to end) vs {NO_LLM_LABEL}" in doc["comparisons"]
    assert set(doc["candidate_recall"]) >= {"sasrec@20", "merged@20"}
    rec = palr.recommend(user="1", k=5)
    assert len(rec.items) == 5
    # the trees-only run over the same sources
    frun = train_feature_run(rrun, tmp_path / "feat", FeatureRankerConfig(n_candidates=20, text_encoder="tfidf"),
                             data_dir=data_dir, sources="itemknn:5,popularity:3")
    fdoc = evaluate_palr_run(frun, data_dir=data_dir, progress=False)
    assert fdoc is not None and fdoc["candidate_recall"]["merged@20"] == doc["candidate_recall"]["merged@20"]

