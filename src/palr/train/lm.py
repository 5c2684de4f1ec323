"""`palr finetune`: instruction fine-tuning of the ranking LLM on top of a retriever run.

* The embedded model (``--base-model mini``) is created from the catalogue (tokenizer + small LLaMA with
  one token per item), its item tokens optionally initialised from the retriever's item embeddings
  (the LLaRA/CoLLM idea of handing collaborative knowledge to the LLM), and trained fully.
* A pretrained model (a local path or hub id) gets LoRA adapters (peft); only the adapter is saved.

Loss only on answer tokens (the language-model loss), plus for verbalizer records a listwise loss over
the candidates' labels. Built on the Hugging Face ``Trainer`` so the same command runs under
``accelerate launch`` on several GPUs; checkpoints every epoch, resume when interrupted, and the best
epoch by validation NDCG@10 (ranking metrics on validation users) is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palr.core import distributed
from palr.core.console import progress_enabled
from palr.core.errors import ConfigError
from palr.core.metrics import ndcg
from palr.core.settings import FinetuneConfig
from palr.data.dataset import Split
from palr.llm.hf import HFLLM
from palr.llm.mini import build_mini, item_token_ids
from palr.llm.prompts import history_head
from palr.rank.llm_ranker import FUSION_GRID, PromptBuilder, Ranker, choose_weight, fuse, positional_ranks
from palr.runs.store import build_dir_atomic
from palr.train.examples import Example

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- model set-up
def build_base(cfg: FinetuneConfig, split: Split, out: Path, retriever: Any,
               text_emb: np.ndarray | None = None) -> tuple[Any, Any]:
    """The model to train and its tokenizer: a new mini model, or a pretrained one with LoRA.

    The mini model's item tokens start from ``item_vectors(cfg.item_init, ...)`` (see there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.base_model == "mini":

        base_dir = out / "base"

        def build(tmp: Path) -> None:
            build_mini(split.dataset.catalog, tmp, vocab_size=cfg.mini.vocab, item_tokens=True,
                       n_layer=cfg.mini.layers, n_embd=cfg.mini.dim, n_head=cfg.mini.heads, seed=cfg.seed)

        if not (base_dir / "config.json").exists():
            build_dir_atomic(base_dir, build)  # a kill while building leaves no half-written base/
        try:
            tok = AutoTokenizer.from_pretrained(base_dir)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a damaged base/ (written by an older palr) is rebuilt
            log.warning("rebuilding %s: it does not load (%s)", base_dir, type(e).__name__)
            build_dir_atomic(base_dir, build)
            tok = AutoTokenizer.from_pretrained(base_dir)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        vectors = initial_item_vectors(cfg.item_init if cfg.init_from_retriever else "none", cfg.mini.dim,
                                       getattr(retriever, "item_vectors", lambda: None)(), text_emb)
        if vectors is not None:
            init_item_embeddings(model, item_token_ids(tok, split.n_items), vectors)
        return model, tok

    llm = HFLLM(cfg.base_model, dtype="auto")
    model, tok = llm.model, llm.tokenizer
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, task_type="CAUSAL_LM",
                          target_modules="all-linear")
        model = get_peft_model(model, lcfg)
    model.train()
    return model, tok


def pca(x: np.ndarray, d: int) -> np.ndarray:
    """(N, d) principal components of ``x`` (centred), each column scaled to unit variance; sign-fixed."""
    x = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(axis=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    d = min(d, len(s))
    z = u[:, :d] * s[:d]
    z *= np.sign(vt[:d].sum(axis=1) + 1e-12)[None, :]
    return (z / (z.std(axis=0, keepdims=True) + 1e-8)).astype(np.float32)


def initial_item_vectors(kind: str, dim: int, retriever_vectors: np.ndarray | None,
                         text_emb: np.ndarray | None) -> np.ndarray | None:
    """Item-token initialisation (N, dim): the retriever's ID embeddings ("retriever"), the pretrained text
    encoder's embeddings of the items' titles and tags ("text"), or both ("hybrid": the first half of the
    dimensions from the retriever, the rest from the text, each reduced by PCA), as LLaRA/CoLLM hand
    collaborative and textual knowledge to the LLM. Falls back to what exists; None = random."""
    if kind not in ("retriever", "text", "hybrid", "none"):
        raise ValueError(f"item_init must be retriever, text, hybrid or none, got {kind!r}")
    if kind == "none":
        return None
    if kind == "hybrid" and retriever_vectors is not None and text_emb is not None:
        half = dim // 2
        return np.concatenate([pca(retriever_vectors, half), pca(text_emb, dim - half)], axis=1)
    source = text_emb if (kind == "text" or retriever_vectors is None) else retriever_vectors
    return None if source is None else pca(source, dim)


def init_item_embeddings(model: Any, token_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Copy retriever item embeddings (N, d_r) into the item tokens' rows, rescaled to the embedding std."""
    import torch

    emb = model.get_input_embeddings().weight
    d = min(emb.shape[1], vectors.shape[1])
    v = torch.as_tensor(vectors[:, :d], dtype=emb.dtype)
    v = v / (v.std() + 1e-8) * emb.detach().std()
    with torch.no_grad():
        emb[torch.as_tensor(token_ids)] = 0.0
        emb[torch.as_tensor(token_ids), :d] = v
    log.info("initialised %d item tokens from %d-d item vectors", len(token_ids), vectors.shape[1])


def warmup_keyword(arguments_class: Any) -> str:
    """The ``TrainingArguments`` field that takes a warm-up *ratio*: transformers 4 has ``warmup_ratio``
    (its ``warmup_steps`` is a count: 0.05 there meant no warm-up); transformers 5 has ``warmup_steps`` only,
    and reads a float in [0, 1) as a ratio."""
    return "warmup_ratio" if "warmup_ratio" in getattr(arguments_class, "__dataclass_fields__", {}) else "warmup_steps"


def training_arguments(**kw: Any) -> Any:
    """``TrainingArguments`` that shard under a launcher (``torchrun``, ``accelerate launch``).

    Without CUDA the Trainer stays single-process even with ``WORLD_SIZE`` set; ``use_cpu`` with the ``gloo``
    backend makes it data-parallel over CPU processes. Settings an ``accelerate launch`` config brings
    (DeepSpeed, mixed precision) are read by the Trainer itself.
    """
    import torch
    from transformers import TrainingArguments


    if distributed.world_size() > 1 and not torch.cuda.is_available():
        kw.setdefault("use_cpu", True)
        kw.setdefault("ddp_backend", "gloo")
    if distributed.world_size() > 1:
        kw.setdefault("ddp_find_unused_parameters", False)  # palr_loss uses every trainable weight
    if "warmup_ratio" in kw:  # a share of the training steps, whichever way this transformers spells it
        ratio = float(kw.pop("warmup_ratio"))
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {ratio}")
        kw[warmup_keyword(TrainingArguments)] = ratio
    base = {"report_to": [], "remove_unused_columns": False, "dataloader_num_workers": 0,
            "dataloader_pin_memory": False}  # no pinned memory on a CPU (torch warned on every fine-tune)
    return TrainingArguments(**{**base, **kw})


def pretrain_rows(tok: Any, split: Split, builder: PromptBuilder, window: int = 100) -> list[dict[str, Any]]:
    """Training sequences written as the prompts write a history, cut into windows of ``window`` items;
    labels on the item tokens only (the next-item "language")."""

    head = tok.encode(history_head(builder.catalog), add_special_tokens=True)
    ids_of = item_token_ids(tok, split.n_items)
    rows = []
    for s in split.train:
        for start in range(0, len(s), window):
            chunk = s[max(0, start - 10): start + window] if start else s[:window]
            if len(chunk) >= 2:
                items = ids_of[chunk].tolist()
                rows.append({"input_ids": head + items, "labels": [-100] * len(head) + items, "cand_ids": [],
                             "target": -1})
    return rows


def pretrain_sequences(model: Any, tok: Any, split: Split, builder: PromptBuilder, epochs: int, *,
                       window: int = 100, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                       progress: bool = False, output_dir: str | Path | None = None) -> list[float]:
    """Teach the embedded model the item-token "language" before instruction tuning.

    Each training sequence (train split only) is written as the prompts write a history,
    ``Input: User watched movies <i1><i7>...``, cut into windows of ``window`` items; the model learns
    every next item token (plain causal LM loss, constant learning rate, gradients clipped at 1). Runs in the
    Hugging Face ``Trainer``, so under a launcher every process trains on its share. Returns the mean loss per
    epoch (over all processes).
    """
    import tempfile


    if epochs <= 0:
        return []
    rows = pretrain_rows(tok, split, builder, window)
    with tempfile.TemporaryDirectory(prefix="palr-pretrain-") as tmp:
        args = training_arguments(
            output_dir=str(output_dir or tmp), num_train_epochs=epochs, learning_rate=lr,
            per_device_train_batch_size=batch_size, weight_decay=0.01, max_grad_norm=1.0,
            lr_scheduler_type="constant", warmup_steps=0, eval_strategy="no", save_strategy="no",
            logging_strategy="no", seed=seed, data_seed=seed, disable_tqdm=not progress_enabled(progress))
        trainer = lm_trainer_class()(model=model, args=args, train_dataset=rows,
                                     data_collator=lambda b: collate(b, tok.pad_token_id))
        quiet_trainer_logs(trainer)
        trainer.train()
    model.eval()
    log.info("pretraining: %d sequences, %d steps per process, loss per epoch %s", len(rows),
             trainer.state.global_step, [round(x, 4) for x in trainer.epoch_losses])
    return trainer.epoch_losses


def quiet_trainer_logs(trainer: Any) -> None:
    """The Trainer's log dicts go to the run's log file (INFO), not printed under the progress bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    def on_log(self: Any, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs:
            log.info("step %d: %s", state.global_step,
                     ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()))

    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(type("LogToFile", (ProgressCallback if had_bar else TrainerCallback,), {"on_log": on_log}))


def lm_trainer_class() -> Any:
    """A ``Trainer`` with PALR's loss that keeps the mean training loss of every epoch (``epoch_losses``)."""
    from transformers import Trainer, TrainerCallback


    class EpochLoss(TrainerCallback):
        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            tr = self.trainer
            mine = float(np.mean(tr.batch_losses)) if tr.batch_losses else float("nan")
            every = distributed.gather(mine, everyone=True) or [mine]
            tr.epoch_losses.append(float(np.mean(every)))
            tr.batch_losses = []

    class LMTrainer(Trainer):
        listwise_weight = 0.0

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.batch_losses: list[float] = []
            self.epoch_losses: list[float] = []
            cb = EpochLoss()
            cb.trainer = self  # type: ignore[attr-defined]
            self.add_callback(cb)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = palr_loss(model, inputs, self.listwise_weight)
            if model.training:
                self.batch_losses.append(float(loss.detach()))
            return (loss, None) if return_outputs else loss

    return LMTrainer


def unwrap(model: Any) -> Any:
    """The model inside a DistributedDataParallel / DeepSpeed wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


# ---------------------------------------------------------------------------- records -> tensors
def encode_records(examples: list[Example], split: Split, tok: Any, builder: PromptBuilder,
                   tasks: tuple[str, ...], max_length: int, labels_text: list[str] | None) -> list[dict[str, Any]]:
    """Token ids, answer-only labels, and for verbalizer rows the candidates' label token ids."""

    item_ids = item_token_ids(tok, split.n_items) if builder.style == "tokens" else None
    label_ids = ([tok.encode(x, add_special_tokens=False)[-1] for x in labels_text] if labels_text else None)
    rows = []
    for e in examples:
        for task in tasks:
            lab_map = None
            if task == "verbalizer" and builder.style == "text":
                lab_map = {int(c): labels_text[k] for k, c in enumerate(e.candidates)}  # type: ignore[index]
            prompt = builder.prompt(task, e.history, e.profile, e.candidates.tolist(),
                                    labels_text if builder.style == "text" else None, ranks=e.ranks)
            answer = builder.answer(task, e.targets, lab_map)
            p_ids = tok.encode(prompt, add_special_tokens=True)
            a_ids = tok.encode(answer, add_special_tokens=False) + ([] if task == "verbalizer" else [tok.eos_token_id])
            ids = (p_ids + a_ids)[-max_length:]
            n_ans = min(len(a_ids), len(ids) - 1)
            row = {"input_ids": ids, "labels": [-100] * (len(ids) - n_ans) + ids[len(ids) - n_ans:],
                   "cand_ids": [], "target": -1}
            if task == "verbalizer":
                row["cand_ids"] = (item_ids[e.candidates].tolist() if item_ids is not None
                                   else label_ids[: len(e.candidates)])  # type: ignore[index]
                row["target"] = int(np.flatnonzero(e.candidates == e.targets[0])[0])
            rows.append(row)
    return rows


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    T = max(len(r["input_ids"]) for r in rows)
    K = max((len(r["cand_ids"]) for r in rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    cands = torch.zeros((len(rows), max(K, 1)), dtype=torch.long)
    target = torch.full((len(rows),), -1, dtype=torch.long)
    for b, r in enumerate(rows):  # right padding for training
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
        if r["cand_ids"]:
            cands[b, : len(r["cand_ids"])] = torch.tensor(r["cand_ids"])
            target[b] = r["target"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "cand_ids": cands, "target": target}


def palr_loss(model: Any, batch: dict[str, Any], listwise_weight: float) -> Any:
    """LM loss on answer tokens + listwise CE over the candidates' labels (verbalizer rows)."""
    import torch
    import torch.nn.functional as F

    # through the (possibly DDP/DeepSpeed-wrapped) model, so that gradients are synchronised; the LM head runs on
    # the last position only and the post-norm hidden states feed the losses below
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                output_hidden_states=True)
    h = out.hidden_states[-1]
    W = unwrap(model).get_output_embeddings().weight  # (V, d)
    labels = batch["labels"]
    nxt = labels[:, 1:]
    sel = nxt != -100  # positions whose next token is an answer token
    hs = h[:, :-1][sel]  # (N, d)
    loss = F.cross_entropy(hs @ W.T, nxt[sel])
    rows = batch["target"] >= 0
    if listwise_weight and rows.any():
        first = sel.float().argmax(dim=1)  # position predicting the first answer token
        hq = h[torch.arange(len(h)), first][rows]  # (B', d)
        cand_w = W[batch["cand_ids"][rows]]  # (B', K, d)
        logits = torch.einsum("bd,bkd->bk", hq, cand_w)
        loss = loss + listwise_weight * F.cross_entropy(logits, batch["target"][rows])
    return loss


# ---------------------------------------------------------------------------- validation by ranking
@dataclass
class ValidationSet:
    users: np.ndarray
    histories: list[np.ndarray]
    profiles: list[str | None]
    candidates: np.ndarray  # (U, K) retriever order
    targets: np.ndarray
    scores: np.ndarray  # (U, K) the retriever's scores of the candidates


def validation_set(split: Split, candidates: tuple[np.ndarray, np.ndarray], n_users: int, profiler: Any,
                   seed: int, among: np.ndarray | None = None) -> ValidationSet:
    """A seeded subset of validation users (of ``among``, default all) with their precomputed candidates."""
    cands, scores = candidates
    rng = np.random.default_rng(seed + 7)
    users = np.arange(len(split.train)) if among is None else np.asarray(among)
    if 0 < n_users < len(users):
        users = np.sort(rng.choice(users, n_users, replace=False))
    hist = [split.train[u] for u in users]
    prof = (profiler.texts(hist, users) if hasattr(profiler, "texts") else [profiler(h) for h in hist])
    return ValidationSet(users, hist, prof, cands[users], split.valid_targets[users], scores[users])


def rank_metrics(ranker: Ranker, vs: ValidationSet, per_user: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """NDCG@10 of the LLM alone, of the retriever alone, and of the best fusion weight on this set.

    ``per_user`` (a dict, filled): each user's 1-based target rank by the LLM alone (``llm``), the retriever alone
    (``retriever``) and the chosen fusion (``fused``), 10**9 where the target is not a candidate.

    Under a launcher each process scores its block of whole batches of users and every process gets all of them,
    so the choice is the same everywhere (and the same as one process's)."""

    mine = distributed.shard(len(vs.histories), ranker.batch_size)
    lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
    part = ranker.verbalizer_logprobs(vs.histories[lo:hi], vs.profiles[lo:hi], vs.candidates[lo:hi])
    lp = distributed.gather_arrays({"lp": part}, everyone=True)["lp"]  # type: ignore[index]
    kind, best_w, table = choose_weight(lp, vs.candidates, vs.targets, FUSION_GRID, scores=vs.scores)
    llm_ranks = positional_ranks(fuse(lp, 0.0), vs.candidates, vs.targets)
    llm_only = ndcg(llm_ranks, 10)
    if per_user is not None:
        per_user.update(llm=llm_ranks, fused=positional_ranks(fuse(lp, best_w, vs.scores, kind), vs.candidates,
                                                              vs.targets),
                        retriever=positional_ranks(fuse(lp, float("inf")), vs.candidates, vs.targets))
    return {"ndcg@10": table[f"{kind}:{best_w}"], "ndcg@10_llm": llm_only, "ndcg@10_retriever": table["rank:inf"],
            "weight": best_w, "fusion": kind}
