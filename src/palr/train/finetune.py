"""The `palr finetune` job: retriever run -> instruction data -> Trainer -> a complete PALR run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from palr.core import distributed
from palr.core.console import progress_enabled
from palr.core.errors import PalrError
from palr.core.options import flat
from palr.core.settings import FinetuneCommand
from palr.llm.hf import HFLLM, merge_adapter
from palr.llm.protocol import single_token_labels
from palr.llm.trust import run_model_spec
from palr.rank.features import CandidateFeatures
from palr.rank.fusion import held_out_table
from palr.rank.llm_ranker import PromptBuilder, Ranker, RankingConfig
from palr.rank.profiles import AttributeProfiler, HistoryProfiles, ProfileCache, make_profiler
from palr.rank.stacked import fit_stacked, stacked_lists, users_with_seen_valid_targets
from palr.rank.trees import FeatureRankerConfig, fit_feature_ranker, split_users
from palr.retrieval.candidates import CandidateSources, candidates_for, parse_sources
from palr.retrieval.load import load_run
from palr.runs.safety import read_json
from palr.runs.snapshot import link_snapshot
from palr.runs.store import begin_run, build_dir_atomic, copy_tree_atomic, finish_run, read_run, tree_digest
from palr.train.examples import (
    attach_candidates,
    augment_swap,
    check_no_leak,
    genuine_contexts,
    records,
    shuffle_candidates,
    training_contexts,
    write_jsonl,
)
from palr.train.lm import (
    FinetuneConfig,
    ValidationSet,
    build_base,
    collate,
    encode_records,
    lm_trainer_class,
    pretrain_sequences,
    quiet_trainer_logs,
    rank_metrics,
    training_arguments,
    validation_set,
)
from palr.train.trees import retriever_name

log = logging.getLogger(__name__)


def attribute_profiler(catalog: Any, enabled: bool = True) -> Any:
    """history -> profile text (the deterministic attribute profile; None when disabled)."""

    return HistoryProfiles("-", catalog, AttributeProfiler(), enabled=enabled)


def run_profiles(dataset: Any, cfg: FinetuneConfig, out: Path | None) -> Any:
    """The profiles fine-tuning reads, from ``cfg.profiler`` (``attributes`` or ``llm:SPEC``), cached in the run
    (``profiles.sqlite``) so that ranking with the run reads the very same ones."""

    if cfg.profiler == "llm":
        raise PalrError("fine-tuning cannot profile with the model it trains: give --profiler llm:SPEC "
                        "(another LLM) or attributes")
    cache = ProfileCache(out / "profiles.sqlite") if out is not None and cfg.profiler != "attributes" else None
    return HistoryProfiles(dataset.name, dataset.catalog, make_profiler(spec=cfg.profiler, allow_fallback=False),
                           cache, enabled=cfg.profiles, user_attributes=dataset.user_attributes)


def _trainer_class() -> Any:
    class PalrTrainer(lm_trainer_class()):  # type: ignore[misc]
        """Trainer with PALR's loss and validation by ranking metrics (NDCG@10 of the fused ranking)."""

        palr_cfg: FinetuneConfig
        palr_valid: ValidationSet
        palr_builder: PromptBuilder
        palr_losses: list[float]  # training loss of every batch (the run's training curve)
        palr_curve: list[dict[str, float]]  # per evaluation: epoch, mean training loss since the last, NDCG@10

        @property
        def listwise_weight(self) -> float:  # type: ignore[override]
            return self.palr_cfg.listwise_weight

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:  # this process's batches (the main process's make the run's curve)
                self.palr_losses.append(self.batch_losses[-1])
            return out

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:

            model = self.model
            was_training = model.training
            model.eval()
            llm = HFLLM.from_objects(model, self.processing_class, batch_size=64)
            m = rank_metrics(Ranker(llm, self.palr_builder), self.palr_valid)  # sharded over processes, gathered
            if was_training:
                model.train()
            metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in m.items() if k != "fusion"}
            done = sum(int(c["batches"]) for c in self.palr_curve)
            since = self.palr_losses[done:]
            self.palr_curve.append({"epoch": round(float(self.state.epoch or 0.0), 3), "batches": len(since),
                                    "train_loss": round(float(np.mean(since)), 5) if since else float("nan"),
                                    **{f"valid_{k}": round(float(v), 5) for k, v in m.items() if k != "fusion"}})
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return PalrTrainer


def finetune(retriever_run: str | Path, out: str | Path, cfg: FinetuneConfig, *, data_dir: str | Path | None = None,
             progress: bool = True, resume: bool = True, overwrite: bool = False) -> Path:
    """Fine-tune the ranking LLM over a retriever run; writes a complete ``palr`` run directory at ``out``.

    ``out`` is reused (checkpoints resumed) only when it was started with the same settings and the same
    retriever run; otherwise it is refused, or emptied with ``overwrite``.

    Under a launcher (``torchrun``/``accelerate launch`` with N processes) every process trains on its share of the
    records (the Trainer's distributed sampler, pretraining included); validation ranking and the fusion-weight
    choice are sharded and gathered; only the main process writes the run directory, the others wait for it.
    """
    import torch
    from transformers import set_seed


    command = FinetuneCommand(run=Path(retriever_run), out=Path(out), train=cfg, data_dir=Path(data_dir) if data_dir
                              else None)  # refuses --out == --run
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    distributed.init()
    main = distributed.is_main()
    rcfg, retriever, split = load_run(retriever_run, data_dir)
    out = Path(distributed.broadcast(str(begin_run(out, overwrite=overwrite, args=run_args(
        command, rcfg))) if main else None))
    set_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # the PALR run carries a fresh copy of its retriever so that it is self-contained
    if main:
        copy_tree_atomic(Path(retriever_run) / "model", out / "retriever")
    profile_of = run_profiles(split.dataset, cfg, out if main else None)

    # 1. instruction data: genuine candidates of the fit share of validation users and/or training prefixes;
    #    the held-out share trains nothing (it picks the epoch and the fusion weights)

    K = cfg.examples.n_candidates
    # every process builds the same lists (the sampler shards the records); one spare: the test item is skipped
    sources = (CandidateSources.fit(split, retriever, retriever_name(rcfg), K, cfg.sources)
               if parse_sources(cfg.sources) else None)
    src_feats = None
    if sources is not None:  # candidates merged from several retrievers (every process computes all rows)
        ranked, ranked_scores, src_feats = sources.merged_for(split, "valid", spare=1)
        src_feats = src_feats[:, :K]
    else:
        ranked, ranked_scores = candidates_for(retriever, split, "valid", K + 1, sharded=True)
    valid_cands = (ranked[:, :K], ranked_scores[:, :K])
    fit_users, held_out = split_users(len(split.train), cfg.holdout, cfg.seed)
    source = cfg.examples.source
    if source not in ("valid", "prefixes", "both"):
        raise PalrError(f"unknown example source {source!r}; use valid, prefixes or both")
    ex = []
    if source in ("prefixes", "both"):
        ex += attach_candidates(training_contexts(split, cfg.examples, exclude=held_out), split, retriever,
                                cfg.examples, progress=progress)
    if source in ("valid", "both"):
        # lists that keep the retriever's order (rank evidence, or retriever lists) drop the users it missed
        in_order = cfg.examples.evidence == "rank" or cfg.examples.lists == "retriever"
        genuine = genuine_contexts(split, fit_users, ranked, K, retrieved_only=in_order)
        ex += genuine if in_order else shuffle_candidates(genuine, cfg.seed)
    ex = augment_swap(ex, cfg.examples.swap_prob, np.random.default_rng(cfg.seed + 3))
    check_no_leak(ex, split, held_out)
    for e, text in zip(ex, profile_of.texts([e.history for e in ex], [e.user for e in ex])):
        e.profile = text
    feats = None
    if cfg.feature_ranker or cfg.stacked or cfg.item_init in ("text", "hybrid"):

        feats = CandidateFeatures().fit(split, cfg.text_encoder, cfg.seed)
    with distributed.main_first():  # the main process creates base/, the others load it
        model, tok = build_base(cfg, split, out, retriever, None if feats is None else feats.emb)
    builder = PromptBuilder(split.dataset.catalog, cfg.style, cfg.examples.history_len,  # type: ignore[arg-type]
                            evidence=cfg.examples.evidence)
    ckpt = out / "checkpoints"
    pre_losses: list[float] = []
    if cfg.base_model == "mini" and cfg.pretrain_epochs > 0 and not _last_checkpoint(ckpt):
        pre_losses = pretrain_sequences(model, tok, split, builder, cfg.pretrain_epochs, lr=cfg.lr, seed=cfg.seed,
                                        progress=progress)
    labels_text = None
    if cfg.style == "text":

        labels_text = single_token_labels(tok, cfg.examples.n_candidates)
    if main:
        n_rec = write_jsonl(out / "instructions.jsonl", records(ex[:2000], cfg.tasks, lambda e, t: (
            builder.prompt(t, e.history, e.profile, e.candidates.tolist(), labels_text, ranks=e.ranks),
            builder.answer(t, e.targets, {int(c): labels_text[k] for k, c in enumerate(e.candidates)}
                           if labels_text and t == "verbalizer" else None))))
    rows = encode_records(ex, split, tok, builder, cfg.tasks, cfg.max_length, labels_text)
    if main:
        log.info("%d training contexts -> %d records (%d written to instructions.jsonl)", len(ex), len(rows), n_rec)

    # 2. held-out validation users ranked after every epoch
    vs = validation_set(split, valid_cands, cfg.valid_users, profile_of, cfg.seed, among=held_out)

    # 3. train (the Trainer saves checkpoints from the main process and shards the records over processes)
    args = training_arguments(
        output_dir=str(ckpt), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, lr_scheduler_type="cosine",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="ndcg@10", greater_is_better=True, logging_steps=50,
        seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not progress_enabled(progress),
    )
    trainer_cls = _trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, eval_dataset=rows[:1],
                          data_collator=lambda b: collate(b, tok.pad_token_id), processing_class=tok)
    trainer.palr_cfg, trainer.palr_valid, trainer.palr_builder = cfg, vs, builder
    trainer.palr_losses, trainer.palr_curve = [], []
    quiet_trainer_logs(trainer)
    last = _last_checkpoint(ckpt) if resume else None
    if last:
        log.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    model = trainer.model
    model.eval()

    # 4. save the best model (full weights for mini, adapter only for LoRA)
    llm_dir = out / ("llm" if cfg.base_model == "mini" else "adapter")
    if main:
        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cfg.base_model == "mini":
                shutil.copy(out / "base" / "palr_mini.json", tmp / "palr_mini.json")

        build_dir_atomic(llm_dir, save)  # never a half-written model folder

    # 5. fusion kind and weight on (up to cfg.weight_users) validation users, never on test

    llm = HFLLM.from_objects(model, tok, batch_size=64)
    vs_all = validation_set(split, valid_cands, cfg.weight_users, profile_of, cfg.seed, among=held_out)
    held_ranks: dict[str, np.ndarray] = {}
    final = rank_metrics(Ranker(llm, builder), vs_all, held_ranks)  # sharded, the same result on every process
    features_doc = None
    if cfg.feature_ranker:  # 6. the feature ranker (fit share, stopped on the held-out share), fused on held-out

        fcfg = FeatureRankerConfig(n_candidates=K, holdout=cfg.holdout, text_encoder=cfg.text_encoder, seed=cfg.seed)
        franker, fmetrics = fit_feature_ranker(split, valid_cands, fcfg, features=feats)  # deterministic
        table = held_out_table(Ranker(llm, builder), franker, vs_all)
        # the run ranks with the fused PALR ranker only when it beats the LLM fused with the retriever on the
        # held-out users (ties: the simpler LLM + retriever); the trees are kept in the run either way
        chosen = table["ndcg@10"] > final["ndcg@10"]
        features_doc = {"dir": "feature_ranker", "weight": table["weight"]} if chosen else None
        final["features"] = {**table, "trees": fmetrics, "chosen": chosen}
        if main:
            franker.save(out / "feature_ranker")
    stacked_doc = None
    if cfg.stacked:  # 7. the stacked ranker: the LLM's scores as features of the trees (and its twin without them)
        assert feats is not None
        fcfg = FeatureRankerConfig(n_candidates=K, holdout=cfg.holdout, text_encoder=cfg.text_encoder, seed=cfg.seed)
        seen = users_with_seen_valid_targets(ex, split)  # their validation targets trained the LLM: never fit
        stack_fit = np.setdiff1d(fit_users, seen)
        n_lists = int((valid_cands[0][stack_fit] == split.valid_targets[stack_fit, None]).any(axis=1).sum())
        if n_lists < MIN_STACK_LISTS:  # e.g. --source valid: the LLM trained on every fit user's validation item
            final["stacked"] = {"skipped": f"{n_lists} validation lists whose target the LLM never trained on "
                                           f"(at least {MIN_STACK_LISTS} needed; {len(seen)} users excluded)"}
            log.warning("stacked ranker not fitted: %s", final["stacked"]["skipped"])
        else:
            try:
                stacked_doc = _fit_stacked_step(split, valid_cands, fcfg, stack_fit, held_out, feats, sources,
                                                src_feats, Ranker(llm, builder, batch_size=64), profile_of, final,
                                                len(seen), out if main else None)
            except PalrError as e:  # too few held-out lists with the target: nothing to stop the boosting on
                final["stacked"] = {"skipped": str(e)}
                log.warning("stacked ranker not fitted: %s", e)
    if sources is not None:
        final["candidate_recall"] = sources.recall(split, "valid")
        if main:
            sources.save(out / "candidate_sources")
    distributed.barrier()  # every process is done with the checkpoints
    if main:
        history = [h for h in trainer.state.log_history if "eval_ndcg@10" in h]
        ranking = RankingConfig(
            mode="verbalizer", style=cfg.style, weight=final["weight"], fusion=final["fusion"],
            n_candidates=cfg.examples.n_candidates, history_len=cfg.examples.history_len,
            evidence=cfg.examples.evidence, profiles=cfg.profiles, profiler=cfg.profiler, base_model=cfg.base_model,
            llm_dir=llm_dir.name, lora=bool(cfg.lora_r and cfg.base_model != "mini"), features=features_doc,
            stacked=stacked_doc, user_attributes=bool(cfg.profiles and split.dataset.user_attributes),
            candidates=None if sources is None else {"dir": "candidate_sources", "counts": sources.counts}).write(out)
        # per held-out validation user: target rank by the LLM alone, the retriever alone, the fusion (paired CIs)
        np.savez_compressed(out / "held_out_ranks.npz", users=vs_all.users, **held_ranks)
        world = distributed.world_size()
        metrics = {"valid": final, "valid_per_epoch": history, "pretrain_losses": pre_losses,
                   "curve": trainer.palr_curve, "train_loss_steps": downsample(trainer.palr_losses),
                   "train_losses": trainer.epoch_losses, "train_records": len(rows), "train_contexts": len(ex),
                   "processes": world, "train_steps_per_process": trainer.state.global_step,
                   "train_batch_global": cfg.batch_size * cfg.grad_accum * world,
                   "seconds": round(time.perf_counter() - t_start, 1)}
        shutil.rmtree(ckpt, ignore_errors=True)  # the best weights are saved; checkpoints were for resuming
        config = {"finetune": {**asdict(cfg), "examples": asdict(cfg.examples)}, "retriever": rcfg["config"],
                  "ranking": ranking}
        link_snapshot(retriever_run, out)  # the PALR run carries its retriever run's data snapshot
        finish_run(out, "palr", split.dataset, config, metrics, data=rcfg.get("data"),
                   inputs={"retriever_run": str(Path(retriever_run).resolve())})
        log.info("PALR run %s: held-out valid NDCG@10 fused %.4f (LLM %.4f, retriever %.4f, weight %s)%s", out,
                 final["ndcg@10"], final["ndcg@10_llm"], final["ndcg@10_retriever"], final["weight"],
                 f"; with the feature ranker {final['features']['ndcg@10']:.4f} (trees alone "
                 f"{final['features']['ndcg@10_features']:.4f}, weight {final['features']['weight']})"
                 if features_doc else "")
        if "holdout_ndcg@10" in final.get("stacked", {}):
            st = final["stacked"]
            log.info("stacked ranker (LLM scores as tree features): held-out NDCG@10 %.4f, without LLM features "
                     "%.4f; %s", st["holdout_ndcg@10"], st["holdout_ndcg@10_without_llm"],
                     "it ranks (held-out users prefer it)" if st["chosen"] else "not used (held-out users prefer "
                     f"{max(st['compared_with'], key=st['compared_with'].get)})")
    distributed.barrier()  # the run is complete when any process returns
    return out


MIN_STACK_LISTS = 20  # validation lists (target among the candidates) the stacked ranker needs to be fitted


def _fit_stacked_step(split: Any, valid_cands: tuple[np.ndarray, np.ndarray], fcfg: FeatureRankerConfig,
                      stack_fit: np.ndarray, held_out: np.ndarray, feats: CandidateFeatures, sources: Any,
                      src_feats: np.ndarray | None, llm_r: Ranker, profile_of: Any, final: dict[str, Any],
                      n_seen: int, out: Path | None) -> dict[str, Any]:
    """Fit the stacked ranker (and its twin) on ``stack_fit`` users' validation lists, compare it on the held-out
    users with what the run ranks with otherwise; record it in ``final["stacked"]``; save it under ``out``."""
    lp = stacked_lists(split, np.concatenate([stack_fit, held_out]), valid_cands[0], llm_r, profile_of)
    stacked, smetrics = fit_stacked(split, valid_cands, fcfg, fit_users=stack_fit, held_out=held_out,
                                    features=feats, sources=sources, source_feats=src_feats, llm_lp=lp,
                                    llm_ranker=llm_r)
    others = {"llm_fused_with_retriever": final["ndcg@10"]}
    if (final.get("features") or {}).get("chosen"):
        others["llm_fused_with_trees"] = final["features"]["ndcg@10"]
    # it ranks only when it beats what the run would rank with otherwise, on the held-out users
    chosen = smetrics["holdout_ndcg@10"] > max(others.values())
    smetrics.update(chosen=chosen, compared_with=others, users_excluded_llm_saw_valid_target=n_seen)
    final["stacked"] = smetrics
    if out is not None:
        stacked.save(out / "stacked")
    return {"dir": "stacked", "chosen": chosen, "llm_features": True}


def run_args(command: FinetuneCommand, rcfg: dict[str, Any]) -> dict[str, Any]:
    """What a PALR run directory must match to be reused: the options and the retriever run's identity."""
    return {**flat(command), "run": str(command.run.resolve()),
            "_retriever_digest": tree_digest(command.run / "model"),
            "_dataset_fingerprint": rcfg["dataset"]["fingerprint"]}


def downsample(values: list[float], points: int = 200) -> list[list[float]]:
    """[[batch, mean loss of the batches up to the next point], ...]: at most ``points`` points of a loss curve."""
    if not values:
        return []
    step = max(1, -(-len(values) // points))
    return [[float(b + 1), round(float(np.mean(values[b:b + step])), 5)] for b in range(0, len(values), step)]


def checkpoint_complete(path: Path) -> bool:
    """A Trainer checkpoint is complete when its trainer_state.json (written last) exists and every
    safetensors file in it is whole (header readable, data as long as the header says)."""
    if not (path / "trainer_state.json").is_file():
        return False
    for f in path.glob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + n + end:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return True


def _last_checkpoint(ckpt: Path) -> Path | None:
    """The newest complete checkpoint; torn ones (a kill during a save) are removed."""
    if not ckpt.is_dir():
        return None
    found = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for p in reversed(found):
        if checkpoint_complete(p):
            return p
        log.warning("removing incomplete checkpoint %s (interrupted during a save)", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def read_ranking(run: str | Path) -> dict[str, Any]:
    return read_json(Path(run) / "ranking.json")  # typed: palr.rank.llm_ranker.RankingConfig.read


def export_model(run: str | Path, out: str | Path) -> Path:
    """The run's ranking LLM as one standalone Hugging Face model directory (serve it with vLLM or
    ``palr model serve``): a LoRA adapter merged into its base model, the embedded model copied as it is."""

    cfg = read_run(run, "palr")
    ranking = read_ranking(run)
    spec, options = run_model_spec(run, str(ranking.get("base_model") or cfg["config"].get("finetune", {}).get(
        "base_model", "")), str(ranking.get("llm_dir", "")), bool(ranking.get("lora")))  # inside the run, no download
    if ranking.get("lora"):
        return merge_adapter(spec.removeprefix("hf:"), options["adapter"], out, offline=bool(options.get("offline")))
    copy_tree_atomic(Path(spec.split(":", 1)[1]), Path(out))
    return Path(out)


__all__ = ["FinetuneConfig", "export_model", "finetune", "read_ranking"]
