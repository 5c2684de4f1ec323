"""A PALR run evaluated end to end on the test split: the retriever, the LLM alone, PALR as the run ranks, the
conditional figures (target retrieved), the stacked ranker and its twin, latency and LLM failures; every row
names what ranked it. Zero-shot runs (a retriever run + ``--llm``) choose their fusion on validation users."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core import distributed
from palr.core.console import progress_enabled
from palr.core.errors import PalrError
from palr.core.io import write_json
from palr.core.metrics import DEFAULT_KS, metrics_from_ranks
from palr.evaluate.retrievers import evaluate_retriever
from palr.evaluate.tables import compare_ranks, statistics_protocol, write_per_user, write_predictions
from palr.rank.llm_ranker import (
    choose_weight,
    floor_missing,
    fuse,
    order_by,
    positional_ranks,
    retriever_prior,
)
from palr.rank.pipeline import PALR
from palr.rank.protocol import LLM, Ranker, palr_label
from palr.rank.stacked import NO_LLM_LABEL

UNUSED_STACKED_LABEL = "stacked ranker with LLM features (not chosen on held-out users)"
from palr.runs.card import write_model_card
from palr.runs.safety import check_outputs
from palr.runs.store import dataset_info


# ---------------------------------------------------------------------------- evaluation
def _rank_all(ranker: Ranker, hist: list[np.ndarray], profiles: list[str | None], cands: np.ndarray,
              cscores: np.ndarray, users: np.ndarray, progress: bool, desc: str, weight: float | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """(scores (U, K) and LLM log-probs (U, K), both in retriever order; failed (U,); invalid generations;
    seconds) of ``ranker`` over all users, a batch at a time."""
    from tqdm.auto import tqdm

    bs = ranker.batch_size
    fused, lps, failed, invalid = [], [], [], 0
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(hist), bs), desc=desc, disable=not progress, leave=False):
        sl = slice(s, s + bs)
        r = ranker.rank(hist[sl], profiles[sl], cands[sl], cscores[sl], users[sl], weight=weight)
        fused.append(r.candidate_scores)
        lps.append(r.llm_logprobs)
        failed.append(r.failed)
        invalid += r.invalid_generations
    K = cands.shape[1]
    if not fused:
        return np.empty((0, K)), np.empty((0, K), np.float32), np.zeros(0, bool), 0, 0.0
    return (np.concatenate(fused), np.concatenate(lps), np.concatenate(failed), invalid,
            time.perf_counter() - t0)


def _llm_alone(lp: np.ndarray, failed: np.ndarray, cands: np.ndarray, cscores: np.ndarray, fusion: str) -> np.ndarray:
    """(U, K) scores of the LLM alone (weight 0), candidates in retriever order; failed rows: the retriever's."""
    fused = fuse(floor_missing(lp), 0.0, cscores, fusion)
    fused[failed] = retriever_prior(cands.shape, cscores, fusion)[failed]
    return fused


def merged_candidates(palr: PALR, hist: list[np.ndarray], users: np.ndarray, batch: int = 512,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The run's merged candidate lists (and the retriever's scores of them) for ``hist``, in batches."""
    assert palr.sources is not None
    parts = [palr.sources.merge(hist[s:s + batch], users[s:s + batch]) for s in range(0, len(hist), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def choose_zero_shot_weight(palr: PALR, n_users: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fusion kind and weight for a zero-shot LLM, chosen on ``n_users`` seeded **validation** users."""

    split = palr.split
    rng = np.random.default_rng(seed + 11)
    users = np.sort(rng.choice(len(split.train), size=min(n_users, len(split.train)), replace=False))
    hist = [split.train[u] for u in users]
    cands, cscores = palr.candidates(hist)
    inner = palr.ranker.llm_ranker
    if inner is None:
        raise PalrError("this run ranks without an LLM: there is no LLM weight to choose")
    _, lp, failed, _, secs = _rank_all(inner, hist, palr.profiles.texts(hist, users), cands, cscores, users, progress,
                                       "LLM ranking (valid)", weight=0.0)

    lp = floor_missing(lp)
    lp[failed] = 0.0  # a failed user: the LLM adds nothing, the prior decides
    kind, w, table = choose_weight(lp, cands, split.valid_targets[users], scores=cscores)
    return {"fusion": kind, "weight": w, "table": {k: round(v, 5) for k, v in table.items()},
            "valid_users": len(users), "valid_failures": int(failed.sum()), "seconds": round(secs, 1)}


def evaluate_palr(palr: PALR, stage: str = "test", ks: Sequence[int] = DEFAULT_KS, progress: bool = True,
                  latency_users: int = 100, users: np.ndarray | None = None,
                  llm_alone: bool = False) -> dict[str, Any] | None:
    """Retriever alone (full ranking), PALR end to end (a retrieval miss counts as a miss; the run's ranker), the
    LLM alone (weight 0; ``llm_alone``: also when the run's ranker does not consult its LLM), PALR on the users
    whose target was retrieved, the ranking time per user and the LLM's failures. ``users``: a subset (all by
    default); the retriever's figures are then on the same subset. ``ranked_by`` names what ordered each row of
    the results (``"PALR: trees + LLM"``).

    Under a launcher with several processes (``torchrun``, ``accelerate launch``) each process ranks a block of
    whole batches of users and the main process gathers the per-user results: the figures are those of one
    process. The main process gets the result, the others None."""

    split = palr.split
    everyone = np.arange(split.dataset.n_users) if users is None else np.asarray(users)
    bs = palr.ranker.batch_size
    retr_bs = 512
    # whole batches of both the retriever and the LLM: every batch holds the users it holds in one process
    sel = everyone[distributed.shard(len(everyone), math.lcm(retr_bs, bs))]
    show = progress_enabled(progress) and distributed.is_main()
    retr = evaluate_retriever(palr.retriever, split, stage, ks, candidates=palr.ranking["n_candidates"],  # type: ignore[arg-type]
                              predictions=max(max(ks), 10), batch_size=retr_bs, users=sel)
    assert retr is not None
    all_hist = split.histories(stage)  # type: ignore[arg-type]
    hist = [all_hist[u] for u in sel]
    targets = split.targets(stage)[sel]  # type: ignore[arg-type]
    cands = retr["candidates"]
    cscores = retr["candidate_scores"]
    retr_hit = np.array([t in row for row, t in zip(cands, targets)], dtype=bool)
    if palr.sources is not None:  # candidates merged from several retrievers: the list the ranker reorders
        cands, cscores = merged_candidates(palr, hist, sel, retr_bs)
    t0 = time.perf_counter()
    profiles = palr.profiles.texts(hist, sel)
    prof_s = time.perf_counter() - t0
    K = cands.shape[1]
    ranker = palr.ranker
    fused, lp, failed_mask, invalid, _ = _rank_all(ranker, hist, profiles, cands, cscores, sel, show,
                                                   f"PALR ranking ({stage})")
    order, _ = order_by(fused, cands)
    ranks_part = positional_ranks(fused, cands, targets)
    # "LLM alone": the LLM's own order over the same candidates. Shown when the ranking asked the LLM anyway, for
    # the LLM ranker (its LLM is the point), or when asked for (``llm_alone``); never the retriever's order
    # relabelled when the LLM was not consulted (the trees alone, or a fused ranker whose LLM weight is 0).
    inner = ranker.llm_ranker
    if llm_alone and inner is None:
        raise PalrError(f"this run ranks with {ranker.label} and holds no LLM: no LLM-alone ranking to write")
    consulted = LLM in ranker.components and bool(np.isfinite(lp).any())
    with_llm = inner is not None and (consulted or llm_alone or inner is ranker)
    part = {"order": order, "ranks": ranks_part,
            "hit": np.array([t in row for row, t in zip(cands, targets)], dtype=bool),
            "retr_ranks": retr["ranks"], "retr_predictions": retr["predictions"], "targets": targets,
            "failed": failed_mask, "invalid": invalid, "retr_hit": retr_hit}
    # the stacked ranker (LLM scores as tree features) against its twin without them: same candidates, same users
    stacked = getattr(ranker, "without_llm", None) is not None and ranker.llm_ranker is not None
    unused = getattr(palr, "unused_stacked", None)
    if unused is not None and len(hist):  # in the run but not chosen on held-out users: measured all the same
        full_u, _, _, _, _ = _rank_all(unused, hist, profiles, cands, cscores, sel, show, f"stacked ({stage})")
        part["unused_ranks"] = positional_ranks(full_u, cands, targets)
    twin_ranker = (ranker if stacked else unused).without_llm() if (stacked or unused is not None) else None
    if twin_ranker is not None and len(hist):
        twin, _, _, _, _ = _rank_all(twin_ranker, hist, profiles, cands, cscores, sel, show,
                                     f"without LLM features ({stage})")
        part["twin_ranks"] = positional_ranks(twin, cands, targets)
    if with_llm:
        assert inner is not None
        lp_alone, failed_alone = lp, failed_mask
        if not consulted:  # the ranking did not ask the LLM: ask it now, alone (weight 0)
            _, lp_alone, failed_alone, _, _ = _rank_all(inner, hist, profiles, cands, cscores, sel, show,
                                                        f"LLM alone ({stage})", weight=0.0)
        alone = _llm_alone(lp_alone, failed_alone, cands, cscores, inner.fusion)
        part["llm_ranks"] = positional_ranks(alone, cands, targets)
        part["llm_order"] = order_by(alone, cands)[0]
    g = distributed.gather_arrays(part)
    if g is None:
        return None
    rank_s = time.perf_counter() - t0
    ranks, hit = g["ranks"], g["hit"]
    # per-user latency: one user at a time, as a service would (the main process, on its own users)
    rng = np.random.default_rng(0)
    lat_users = rng.choice(len(hist), size=min(latency_users, len(hist)), replace=False)
    lat = []
    for u in lat_users:
        t1 = time.perf_counter()
        palr.ranker.rank([hist[u]], [profiles[u]], cands[u:u + 1], cscores[u:u + 1], users=sel[u:u + 1])
        lat.append(time.perf_counter() - t1)
    retr_name = palr.retriever_name
    llm_ranks = g.get("llm_ranks", np.zeros(0, np.int64))
    results = {
        f"{retr_name} (retriever)": {stage: {**metrics_from_ranks(g["retr_ranks"], ks),
                                             f"Recall@{K}": float(g["retr_hit"].mean())}},
        "PALR (end to end)": {stage: {**metrics_from_ranks(ranks, ks), f"Recall@{K}": float(hit.mean())}},
        "LLM alone (end to end)": {stage: {**metrics_from_ranks(llm_ranks, ks), f"Recall@{K}": float(hit.mean())}},
        "PALR (target retrieved)": {stage: metrics_from_ranks(ranks[hit], ks)},
        f"{retr_name} (target retrieved)": {stage: metrics_from_ranks(g["retr_ranks"][hit], ks)},
    }
    timings = {"ranking_s": round(rank_s, 3), "ranking_ms_per_user_batched": round(1000 * rank_s / len(ranks), 3),
               "profiles_s": round(prof_s, 3), "latency_users": len(lat),
               "retriever_eval_s": round(retr["seconds"], 3), "processes": distributed.world_size()}
    if lat:
        timings["ranking_ms_per_user_median"] = round(1000 * statistics.median(lat), 3)
    retr_ranks = g["retr_ranks"]
    per_user_ranks = {f"{retr_name} (retriever)": {stage: retr_ranks}, "PALR (end to end)": {stage: ranks},
                      "LLM alone (end to end)": {stage: llm_ranks},
                      "PALR (target retrieved)": {stage: ranks[hit]},
                      f"{retr_name} (target retrieved)": {stage: retr_ranks[hit]}}
    pairs = [("PALR (end to end)", f"{retr_name} (retriever)"),
             ("LLM alone (end to end)", f"{retr_name} (retriever)"),
             ("PALR (target retrieved)", f"{retr_name} (target retrieved)")]
    if not with_llm:
        for d in (results, per_user_ranks):
            d.pop("LLM alone (end to end)")
        pairs = [p for p in pairs if p[0] != "LLM alone (end to end)"]
    ranked_by: dict[str, str] = {}
    if "twin_ranks" in g:  # the LLM's contribution: the same trees, same candidates, same users, without LLM features
        tr = g["twin_ranks"]
        results[NO_LLM_LABEL] = {stage: {**metrics_from_ranks(tr, ks), f"Recall@{K}": float(hit.mean())}}
        per_user_ranks[NO_LLM_LABEL] = {stage: tr}
        ranked_by[NO_LLM_LABEL] = "trees (no LLM features)"
        full = "PALR (end to end)"
        if "unused_ranks" in g:
            full = UNUSED_STACKED_LABEL
            results[full] = {stage: {**metrics_from_ranks(g["unused_ranks"], ks), f"Recall@{K}": float(hit.mean())}}
            per_user_ranks[full] = {stage: g["unused_ranks"]}
            ranked_by[full] = unused.label  # type: ignore[union-attr]
            pairs.append((full, f"{retr_name} (retriever)"))
        pairs = [(full, NO_LLM_LABEL), *pairs, (NO_LLM_LABEL, f"{retr_name} (retriever)")]
    pairs = [(a, b) for a, b in pairs if len(per_user_ranks[a][stage])]  # no target retrieved: nothing to pair
    ranked_by.update({f"{retr_name} (retriever)": retr_name, "PALR (end to end)": palr_label(ranker),
                      "PALR (target retrieved)": palr_label(ranker), f"{retr_name} (target retrieved)": retr_name})
    candidate_recall: dict[str, Any] = {f"{retr_name}@{K}": float(g["retr_hit"].mean())}
    if palr.sources is not None:
        candidate_recall[f"merged@{K}"] = float(hit.mean())
        candidate_recall["sources"] = palr.sources.counts
    if with_llm:
        ranked_by["LLM alone (end to end)"] = f"{LLM} alone (no retriever prior)"
    return {"results": results, "ranked_by": ranked_by, "consulted": list(ranker.components),
            "candidate_recall": candidate_recall,
            "llm_order": g.get("llm_order"),
            "timings": timings, "order": g["order"], "retriever_predictions": g["retr_predictions"],
            "users": everyone, "targets": g["targets"], "ranks": per_user_ranks,
            "comparisons": compare_ranks(per_user_ranks, pairs, ks), "llm_failures": int(g["failed"].sum()),
            "invalid_generations": g["invalid"]}


def evaluate_palr_run(run: str | Path, out: str | Path | None = None, predictions: str | Path | None = None,
                      retriever_predictions: str | Path | None = None, data_dir: str | Path | None = None,
                      mode: str | None = None, progress: bool = True,
                      per_user: str | Path | None = None, *, llm: str | None = None,
                      llm_predictions: str | Path | None = None, allow_fallback: bool = False,
                      n_users: int = 0, seed: int = 0, n_candidates: int | None = None,
                      valid_users: int | None = None, profiler: str | None = None,
                      latency_users: int = 100, weight: float | None = None,
                      fusion: str | None = None, trust_run_llm: bool = False) -> dict[str, Any] | None:
    """`palr evaluate --run RUN [--llm SPEC]`: the test split, retriever and PALR measured in one run; PALR (and
    the LLM alone) compared with its retriever on the same users (paired-bootstrap 95% CIs of the difference and
    ratio, p-value). ``llm_predictions``: also write the LLM ranker's order alone over the same candidates (JSONL
    like ``predictions``), with its row in the results, even when the run's ranker does not use its LLM.

    A retriever run with ``llm`` is ranked zero-shot; its fusion weight is chosen on ``valid_users`` seeded
    validation users (default: as many as test users), never on test. ``n_users``: a seeded subset of test users
    (0 = all). ``weight``/``fusion``: a fusion chosen elsewhere (on validation users), instead of choosing it here.

    Under a launcher with several processes the users are sharded (:func:`evaluate_palr`); the main process writes
    the files and returns the document, the others return None."""

    check_outputs({"--out": out, "--predictions": predictions, "--retriever-predictions": retriever_predictions,
                   "--per-user": per_user}, [run])  # outputs never overwrite the run's files
    distributed.init()  # before the model loads: each process takes its own GPU
    palr = PALR.load(run, data_dir, mode=mode, llm=llm, allow_fallback=allow_fallback, n_candidates=n_candidates,
                     profiler=profiler, weight=weight, trust_run_llm=trust_run_llm)
    if fusion is not None:
        palr.ranker.fusion = palr.ranking["fusion"] = fusion
    split = palr.split
    users = None
    if n_users and n_users < split.dataset.n_users:
        users = np.sort(np.random.default_rng(seed).choice(split.dataset.n_users, size=n_users, replace=False))
    selection = None
    if palr.ranking.get("zero_shot") and weight is None:
        nv = valid_users if valid_users is not None else (n_users or split.dataset.n_users)
        if nv > 0:
            selection = choose_zero_shot_weight(palr, nv, seed, progress)
            inner = palr.ranker.llm_ranker
            assert inner is not None  # a zero-shot run ranks with its LLM
            inner.weight, inner.fusion, inner.chosen_on = selection["weight"], selection["fusion"], "validation users"
            palr.ranking.update(weight=selection["weight"], fusion=selection["fusion"])
    palr.ranking["ranked_by"] = palr.ranker.label
    ev = evaluate_palr(palr, "test", progress=progress, users=users, latency_users=latency_users,
                       llm_alone=llm_predictions is not None)
    if ev is None:
        return None
    if predictions:
        write_predictions(predictions, split.dataset, ev["order"], users=ev["users"])
    if llm_predictions:
        write_predictions(llm_predictions, split.dataset, ev["llm_order"], users=ev["users"])
    if retriever_predictions:
        write_predictions(retriever_predictions, split.dataset, ev["retriever_predictions"], users=ev["users"])
    retr_name = palr.retriever_name
    if per_user:
        write_per_user(per_user, split.dataset, ev["users"], ev["targets"],
                       {m: ev["ranks"][m]["test"] for m in ("PALR (end to end)", f"{retr_name} (retriever)")})
    n = len(ev["users"])
    counts = palr.llm_counts()
    doc = {"protocol": {**split.dataset.protocol, "ks": list(DEFAULT_KS),
                        "candidates": palr.ranking["n_candidates"],
                        "end_to_end": "a target the retriever did not return counts as a miss",
                        "fusion_weight": palr.ranker.weight, "fusion": palr.ranker.fusion,
                        "fusion_weight_chosen_on": "validation users",
                        "ranking_mode": palr.ranker.mode, "prompt_style": palr.ranking["style"],
                        "ranked_by": palr.ranker.label, "consulted": ev["consulted"],
                        "llm": counts["name"], "zero_shot": bool(palr.ranking.get("zero_shot")),
                        "profiler": counts["profiler"], "test_users": n,
                        "test_users_seed": seed if users is not None else None},
           "dataset": dataset_info(split.dataset), "results": ev["results"], "ranked_by": ev["ranked_by"],
           "comparisons": ev["comparisons"], "statistics": statistics_protocol(), "timings": ev["timings"],
           "llm_failures": ev["llm_failures"], "llm_failure_share": round(ev["llm_failures"] / max(n, 1), 4),
           "invalid_generations": ev["invalid_generations"], "llm": counts,
           "candidate_recall": ev["candidate_recall"]}
    if selection is not None:
        doc["fusion_selection"] = selection
    if out:
        write_json(out, doc)
    if not palr.ranking.get("zero_shot") and not llm and users is None:  # the run's own model on every test user
        save_test_evaluation(Path(run), doc, ev, retr_name)
    doc["ranks"] = ev["ranks"]  # per test user (not written; --per-user writes them)
    return doc


def save_test_evaluation(run: Path, doc: dict[str, Any], ev: dict[str, Any], retriever_name: str) -> None:
    """Keep the test evaluation in the run (``test_results.json`` + per-user ranks in ``test_ranks.npz``) for
    ``palr report`` and the model card. Ranks: retriever = full ranking, PALR = end to end (10**9 = not retrieved)."""
    import os
    import tempfile


    write_json(run / "test_results.json", doc)
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".test_ranks.", suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, users=np.asarray(ev["users"], dtype=np.int64), targets=np.asarray(ev["targets"]),
                        palr=np.asarray(ev["ranks"]["PALR (end to end)"]["test"], dtype=np.int64),
                        retriever=np.asarray(ev["ranks"][f"{retriever_name} (retriever)"]["test"], dtype=np.int64))
    os.chmod(tmp, 0o644)
    os.replace(tmp, run / "test_ranks.npz")
    write_model_card(run)
