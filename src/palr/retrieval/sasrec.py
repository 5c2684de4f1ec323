"""SASRec (Kang & McAuley 2018) trained with cross-entropy over the whole catalogue
(Klenitskiy & Vasilev 2023), with a sampled-softmax option for very large catalogues.

Sequences are right-padded and positions count back from the last item, so the causal mask alone
keeps padding out of every real position, and a history gets the same output alone or in a batch.
Training batches group sequences of similar length (little padding); the loss is taken only on
real positions, gathered before the output projection (tied item embeddings).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from palr.core.console import progress_enabled
from palr.core.errors import PalrError, RunError
from palr.retrieval.base import save_params
from palr.runs.safety import load_safetensors, read_json, safetensors_metadata

log = logging.getLogger(__name__)

# hyper-parameters and their defaults; None = chosen from the training data in ``SASRec.resolve``
DEFAULTS: dict[str, Any] = {
    "hidden": None, "layers": 2, "heads": None, "dropout": None, "max_len": None, "lr": None, "weight_decay": 0.0,
    "batch_size": None, "epochs": None, "patience": None, "eval_every": 1, "loss": "ce", "negatives": 256,
    "seed": 0, "eval_users": 5000, "bf16": True, "smooth": 0.5, "device": "auto",
}
# the data-filled defaults, chosen on validation NDCG@10 (benchmarks/sasrec_sweep.py, benchmarks/RESULTS.md);
# "short": the mean training sequence has fewer than 20 items (Amazon), "long": MovieLens
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "short": {"hidden": 128, "heads": 2, "dropout": 0.5, "lr": 1e-3, "max_len": 50, "batch_size": 256,
              "epochs": 50, "patience": 5},
    "long": {"hidden": 128, "heads": 2, "dropout": 0.3, "lr": 2e-3, "max_len": 200, "batch_size": 128,
             "epochs": 100, "patience": 8},
}

# called after every validation with (epoch, entry); may raise (e.g. optuna.TrialPruned) to stop training
Report = Callable[[int, dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    """"auto" = CUDA when available, else CPU; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------- network
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU feed-forward, both residual."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, d/H)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRecNet(nn.Module):
    """Item ids 1..n (0 = padding) -> hidden states; logits are hidden @ item embeddings (tied)."""

    def __init__(self, n_items: int, d: int, layers: int, heads: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.max_len, self.scale = max_len, math.sqrt(d)
        self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.positions = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """seqs: (B, T) right-padded item ids + 1; lengths: (B,) -> hidden states (B, T, d)."""
        t = torch.arange(seqs.shape[1], device=seqs.device)
        pos = (lengths[:, None] - 1 - t[None, :]).clamp(min=0)  # distance from the last real item
        x = self.drop(self.items(seqs) * self.scale + self.positions(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def item_weights(self) -> torch.Tensor:
        return self.items.weight[1:]  # (N, d)

    def last_hidden(self, histories: Sequence[np.ndarray], group: int = 128) -> torch.Tensor:
        """(B, d): output at each history's last item (the last ``max_len`` items are used).

        Histories are run in groups of ``group`` of similar length (sorted), so short ones are not padded to
        the longest of the batch; the rows come back in the given order.
        """
        clipped = [np.asarray(h)[-self.max_len:] for h in histories]
        dev = self.items.weight.device
        order = np.argsort([len(h) for h in clipped], kind="stable")
        out = torch.empty((len(clipped), self.items.embedding_dim), device=dev)
        for start in range(0, len(order), group):
            idx = order[start:start + group]
            seqs, lengths = pad_right([clipped[i] for i in idx])
            seqs, lengths = seqs.to(dev), lengths.to(dev)
            h = self.forward(seqs, lengths)
            out[torch.from_numpy(idx).to(dev)] = h[torch.arange(len(idx), device=dev), lengths - 1]
        return out

    def score_last(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        return self.last_hidden(histories) @ self.item_weights().T  # (B, N)


def pad_right(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Item-index sequences -> (ids + 1 right-padded with 0 (B, T) int64, lengths (B,)); empty -> one pad."""
    lengths = np.array([max(len(s), 1) for s in seqs], dtype=np.int64)
    out = np.zeros((len(seqs), int(lengths.max()) if len(seqs) else 1), dtype=np.int64)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = np.asarray(s, dtype=np.int64) + 1
    return torch.from_numpy(out), torch.from_numpy(lengths)


# ---------------------------------------------------------------------------- training
def training_windows(train: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every next-item target in ``train``, cut into windows of at most ``max_len`` inputs.

    Returns (padded sequences of ids + 1 (W, max_len + 1) int64, input lengths (W,)); window w's
    inputs are row[:len], its targets row[1:len + 1]. Windows are cut from the end of each sequence.
    """
    rows, lens = [], []
    for s in train:
        s = np.asarray(s, dtype=np.int64) + 1
        for end in range(len(s) - 1, 0, -max_len):  # end = number of inputs in the window
            start = max(0, end - max_len)
            rows.append(s[start:end + 1])
            lens.append(end - start)
    out = np.zeros((len(rows), max_len + 1), dtype=np.int64)
    for w, r in enumerate(rows):
        out[w, : len(r)] = r
    return out, np.array(lens, dtype=np.int64)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of window indices of similar length (so little compute goes to padding)."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_loss(net: SASRecNet, windows: torch.Tensor, lengths: torch.Tensor, loss: str, negatives: int,
               n_items: int, bf16: bool = True) -> torch.Tensor:
    """Mean cross-entropy of the next item over the real positions of a batch of windows.

    With ``bf16`` the output projection (P x N logits, most of the cost) runs in bfloat16, about 3x
    faster on CPUs with AVX512-BF16; the encoder stays float32.
    """
    t = int(lengths.max())
    inputs, targets = windows[:, :t], windows[:, 1:t + 1]  # (B, T)
    real = torch.arange(t, device=windows.device)[None, :] < lengths[:, None]  # (B, T)
    h = net(inputs, lengths)[real]  # (P, d): only real positions reach the output layer
    y = targets[real] - 1  # (P,) item indices
    w = net.item_weights()
    if bf16:
        h, w = h.bfloat16(), w.bfloat16()
    if loss == "ce":
        return F.cross_entropy(h @ w.T, y).float()  # (P, N) logits over the whole catalogue
    neg = torch.randint(n_items, (negatives,), device=h.device)  # shared uniform negatives: logQ is a constant
    pos_logit = (h * w[y]).sum(-1, keepdim=True)  # (P, 1)
    neg_logit = (h @ w[neg].T).masked_fill(neg[None, :] == y[:, None], float("-inf"))  # (P, K)
    zeros = torch.zeros(len(y), dtype=torch.long, device=h.device)
    return F.cross_entropy(torch.cat([pos_logit, neg_logit], 1), zeros).float()


@torch.no_grad()
def validation_ranks(net: SASRecNet, histories: Sequence[np.ndarray], targets: np.ndarray,
                     batch_size: int = 1024) -> np.ndarray:
    """(U,) full-ranking rank of each target with the history excluded and pessimistic ties."""
    net.eval()
    dev = net.items.weight.device
    out = []
    for start in range(0, len(histories), batch_size):
        hist = histories[start:start + batch_size]
        s = net.score_last(hist)  # (B, N)
        tgt = torch.from_numpy(np.asarray(targets[start:start + batch_size], dtype=np.int64)).to(dev)
        rows = torch.arange(len(hist), device=dev)
        ts = s[rows, tgt].clone()
        hrow = torch.from_numpy(np.repeat(np.arange(len(hist)), [len(h) for h in hist])).to(dev)
        hcol = torch.from_numpy(np.concatenate([np.asarray(h, dtype=np.int64) for h in hist])).to(dev)
        s[hrow, hcol] = float("-inf")
        s[rows, tgt] = float("-inf")
        out.append(((s >= ts[:, None]).sum(1) + 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def validate(net: SASRecNet, histories: Sequence[np.ndarray], targets: np.ndarray, batch_size: int = 1024,
             k: int = 10) -> dict[str, float]:
    """Full-ranking HR@k and NDCG@k with the history excluded and pessimistic ties."""
    rank = validation_ranks(net, histories, targets, batch_size)
    n = max(len(rank), 1)
    hit = rank <= k
    return {f"HR@{k}": float(hit.sum()) / n, f"NDCG@{k}": float((hit / np.log2(rank + 1.0)).sum()) / n}


def train_sasrec(net: SASRecNet, train: Sequence[np.ndarray], n_items: int, c: dict[str, Any],
                 valid: tuple[Sequence[np.ndarray], np.ndarray] | None, progress: bool,
                 report: Report | None = None) -> list[dict[str, Any]]:
    """Adam(W) on all next-item targets; early stopping on valid NDCG@10, best weights restored.

    Validation runs every ``eval_every`` epochs; with ``smooth`` > 0 the tracked value is an exponential
    moving average of NDCG@10 (weight ``smooth`` on the past), so one lucky or unlucky evaluation neither
    stops training nor picks the weights. ``report(epoch, entry)`` is called after each validation.
    """
    from tqdm.auto import tqdm

    dev = net.items.weight.device

    rng = np.random.default_rng(int(c["seed"]))
    windows_np, lengths_np = training_windows(train, int(c["max_len"]))
    windows, lengths = torch.from_numpy(windows_np).to(dev), torch.from_numpy(lengths_np).to(dev)
    if valid is not None and int(c["eval_users"]) and len(valid[0]) > int(c["eval_users"]):
        keep = np.sort(rng.choice(len(valid[0]), int(c["eval_users"]), replace=False))
        valid = ([valid[0][i] for i in keep], np.asarray(valid[1])[keep])
    opt = torch.optim.AdamW(net.parameters(), lr=float(c["lr"]), weight_decay=float(c["weight_decay"]))
    log.info("SASRec: %d windows, %d targets, %d items, device %s, config %s", len(lengths_np),
             int(lengths_np.sum()), n_items, dev, json.dumps(c, sort_keys=True))
    history: list[dict[str, Any]] = []
    smooth = float(c["smooth"])
    best, tracked, best_state, waited = -1.0, None, None, 0
    bar = tqdm(range(1, int(c["epochs"]) + 1), desc="sasrec", disable=not progress_enabled(progress))
    for epoch in bar:
        net.train()
        t0, total, steps = time.perf_counter(), torch.zeros((), device=dev), 0
        for idx in length_batches(lengths_np, int(c["batch_size"]), rng):
            ix = torch.from_numpy(idx).to(dev)
            loss = batch_loss(net, windows[ix], lengths[ix], c["loss"], int(c["negatives"]), n_items,
                              bool(c["bf16"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.detach(), steps + 1
        entry: dict[str, Any] = {"epoch": epoch, "loss": round(float(total) / max(steps, 1), 5),
                                 "train_s": round(time.perf_counter() - t0, 2)}
        if valid is not None and (epoch % int(c["eval_every"]) == 0 or epoch == int(c["epochs"])):
            t1 = time.perf_counter()
            entry.update({f"valid_{k}": round(v, 5) for k, v in validate(net, valid[0], valid[1]).items()})
            entry["valid_s"] = round(time.perf_counter() - t1, 2)
            raw = entry["valid_NDCG@10"]
            tracked = raw if tracked is None else smooth * tracked + (1.0 - smooth) * raw
            if smooth:
                entry["valid_NDCG@10_smoothed"] = round(tracked, 5)
            if tracked > best:
                best, waited = tracked, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                waited += 1
            if report is not None:
                report(epoch, entry)
        history.append(entry)
        log.info("epoch %s", json.dumps(entry))
        bar.set_postfix(loss=entry["loss"], ndcg=entry.get("valid_NDCG@10", "-"), best=round(best, 4))
        if valid is not None and waited >= int(c["patience"]):
            log.info("early stop after epoch %d: no better valid NDCG@10 for %d evaluations", epoch, waited)
            break
    if best_state is not None:
        net.load_state_dict(best_state)
        log.info("restored the best weights: valid NDCG@10 %s %.5f", "(smoothed)" if smooth else "", best)
    net.eval()
    return history


# ---------------------------------------------------------------------------- the retriever
class SASRec:
    """Self-attentive sequential retriever (see module docstring).

    Parameters (``None`` = filled from the training data at ``fit`` from ``SHAPE_DEFAULTS``; explicit values
    are kept). "short": the mean training sequence has fewer than 20 items (Amazon), "long": MovieLens.
      hidden 128 and heads 2 (must divide hidden); layers 2; dropout 0.5 short / 0.3 long; max_len 50 short /
      200 long; lr 1e-3 short / 2e-3 long, weight_decay 0 (AdamW); batch_size (windows per step) 256 short /
      128 long; epochs at most 50 short / 100 long;
      early stopping: validation NDCG@10 every ``eval_every`` = 1 epoch, smoothed by an exponential moving
      average (``smooth`` = 0.5, the weight of the past; 0 = raw), stop after ``patience`` = 5 short / 8 long
      validations without a better smoothed value, weights of the best smoothed validation restored;
      loss "ce" (full softmax) or "sampled" (``negatives`` = 256 shared uniform negatives); seed 0;
      eval_users: validate on a fixed random subset of this many users, 5000 (0 = all);
      bf16: compute the output projection of the training loss in bfloat16, True (scores stay float32);
      device: "auto" (CUDA when available) or a torch device ("cpu", "cuda:1").
    Chosen on validation by ``benchmarks/sasrec_sweep.py`` on ml-100k, ml-latest-small and amazon-beauty
    (benchmarks/RESULTS.md, "SASRec defaults").
    """

    name: ClassVar[str] = "sasrec"
    defaults: ClassVar[dict[str, Any]] = DEFAULTS
    param_types: ClassVar[dict[str, Any]] = {  # None by default: from the data
        **{k: int for k in ("hidden", "heads", "max_len", "batch_size", "epochs", "patience")},
        "dropout": float, "lr": float}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise PalrError(f"unknown SASRec parameter(s) {unknown}; known: {sorted(DEFAULTS)}")
        self.config: dict[str, Any] = {**DEFAULTS, **params}
        self.net: SASRecNet | None = None
        self.n_items = 0
        self.history: list[dict[str, Any]] = []

    def params(self) -> dict[str, Any]:
        return dict(self.config)

    def resolve(self, train: Sequence[np.ndarray], n_items: int) -> dict[str, Any]:
        """Fill the unset (None) hyper-parameters from the data and check all of them."""
        if len(train) == 0 or not any(len(s) >= 2 for s in train):
            raise PalrError("SASRec needs training users with at least 2 training items; this data set has none")
        if n_items < 2:
            raise PalrError(f"SASRec needs at least 2 items in the catalogue, got {n_items}")
        c = self.config
        shape = "short" if float(np.mean([len(s) for s in train])) < 20 else "long"
        for key, value in SHAPE_DEFAULTS[shape].items():
            if c[key] is None:
                c[key] = value
        for key in ("hidden", "layers", "heads", "max_len", "batch_size", "epochs", "patience", "eval_every",
                    "negatives"):
            if int(c[key]) < 1:
                raise PalrError(f"SASRec: {key} must be >= 1, got {c[key]}")
        if int(c["hidden"]) % int(c["heads"]):
            raise PalrError(f"SASRec: hidden={c['hidden']} is not divisible by heads={c['heads']}")
        if c["loss"] not in ("ce", "sampled"):
            raise PalrError(f"SASRec: loss must be 'ce' or 'sampled', got {c['loss']!r}")
        if not 0.0 <= float(c["dropout"]) < 1.0:
            raise PalrError(f"SASRec: dropout must be in [0, 1), got {c['dropout']}")
        if not 0.0 <= float(c["smooth"]) < 1.0:
            raise PalrError(f"SASRec: smooth must be in [0, 1), got {c['smooth']}")
        if float(c["lr"]) <= 0:
            raise PalrError(f"SASRec: lr must be > 0, got {c['lr']}")
        return c

    def _build(self) -> SASRecNet:
        c = self.config
        return SASRecNet(self.n_items, int(c["hidden"]), int(c["layers"]), int(c["heads"]), float(c["dropout"]),
                         int(c["max_len"]))

    def fit(self, train: Sequence[np.ndarray], n_items: int, *,
            valid: tuple[Sequence[np.ndarray], np.ndarray] | None = None, progress: bool = False,
            report: Report | None = None) -> SASRec:
        """Train on every next-item target of ``train``; ``valid`` = (histories, targets) only picks the
        epoch (early stopping on NDCG@10, best weights kept). Without ``valid`` all epochs run.
        ``report(epoch, entry)`` sees every validation (``palr tune`` prunes through it)."""
        c = self.resolve(train, n_items)
        torch.manual_seed(int(c["seed"]))
        self.n_items = n_items
        self.net = self._build().to(resolve_device(str(c["device"])))
        self.history = train_sasrec(self.net, train, n_items, c, valid, progress, report)
        self.net.cpu()
        return self

    @torch.no_grad()
    def score(self, histories: Sequence[np.ndarray], batch_size: int = 512) -> np.ndarray:
        """(B, n_items) float32: the last position's output dotted with every item embedding."""
        if self.net is None:
            raise RuntimeError("fit() the retriever first")
        self.net.eval()
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        for start in range(0, len(histories), batch_size):
            chunk = list(histories[start:start + batch_size])
            out[start:start + len(chunk)] = self.net.score_last(chunk).numpy()
        return out

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, hidden) float32 sequence representations (``score`` = these @ item_vectors().T)."""
        if self.net is None:
            raise RuntimeError("fit() the retriever first")
        self.net.eval()
        return self.net.last_hidden(list(histories)).numpy()

    def item_vectors(self) -> np.ndarray:
        """(n_items, hidden) float32 item embeddings."""
        if self.net is None:
            raise RuntimeError("fit() the retriever first")
        return self.net.item_weights().detach().numpy().copy()

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.net is None:
            raise RuntimeError("fit() the retriever first")
        directory = Path(directory)
        save_params(directory, self.name, self.params())
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / "weights.safetensors"), metadata={"n_items": str(self.n_items)})
        (directory / "history.json").write_text(json.dumps(self.history, indent=1))

    @classmethod
    def load(cls, directory: Path) -> SASRec:
        directory = Path(directory)
        model = cls(**read_json(directory / "retriever.json")["params"])
        path = directory / "weights.safetensors"
        meta = safetensors_metadata(path)
        if not str(meta.get("n_items", "")).isdigit():
            raise RunError(f"{path} is damaged: no n_items in its metadata")
        model.n_items = int(meta["n_items"])
        model.net = model._build()
        try:
            model.net.load_state_dict(load_safetensors(path, "torch"))
        except RuntimeError as e:  # missing or misshapen tensors
            raise RunError(f"{path} does not match {directory / 'retriever.json'}: {str(e).splitlines()[0][:200]}") from None
        model.net.eval()
        hist = directory / "history.json"
        model.history = read_json(hist, list) if hist.exists() else []
        return model
