"""The embedded default LLM: a small, randomly initialised LLaMA with a BPE tokenizer trained on the catalogue.

``build_mini`` writes a Hugging Face model directory (config, safetensors, tokenizer, ``palr_mini.json``) that
both ``mini:DIR`` and ``hf:DIR`` load. The fine-tuning step trains it; here it is only created.

Defaults (about 3-4M parameters for ML-1M, fast on a laptop CPU):
vocab_size 4096 byte-level BPE merges + one added token per item (``<i123>`` = dense item 123, when
``item_tokens``) + 64 label tokens (``<c0>``..``<c63>``, the verbalizer's candidate labels), 4 layers,
width 192, 4 heads, MLP 512, RoPE, context 1024, tied embeddings, seed 0.
Special tokens: ``<pad>`` (pad), ``<s>`` (bos, prepended to every encoded text), ``</s>`` (eos), ``<unk>``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import PalrError
from palr.core.settings import MiniConfig
from palr.data.dataset import Catalog
from palr.llm import prompts
from palr.llm.hf import HFLLM
from palr.llm.prompts import PROMPT_VERSION, item_token, label_token
from palr.runs.safety import read_json

log = logging.getLogger(__name__)

__all__ = [
    "MINI_INFO",
    "SPECIAL_TOKENS",
    "build_mini",
    "item_token",
    "item_token_ids",
    "label_token",
    "label_tokens",
    "load_mini",
    "parse_item_tokens",
    "read_mini_info",
]

MINI_INFO = "palr_mini.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_ITEM = re.compile(r"<i(\d+)>")


def label_tokens(n: int) -> list[str]:
    """``[<c0>, ..., <c{n-1}>]``: labels for ``verbalizer_prompt`` and ``score_choices`` (one token each)."""
    return [label_token(k) for k in range(n)]


def parse_item_tokens(text: str) -> list[int]:
    """Dense item indices named by ``<iN>`` tokens in generated text, in order, duplicates kept."""
    return [int(m) for m in _ITEM.findall(text)]


def item_token_ids(tokenizer: Any, n_items: int) -> np.ndarray:
    """(n_items,) token id of each item token; raises PalrError if the tokenizer lacks them."""
    ids = tokenizer.convert_tokens_to_ids([item_token(i) for i in range(n_items)])
    unk = tokenizer.unk_token_id
    if any(t is None or t == unk for t in ids):
        raise PalrError("this tokenizer has no item tokens; build the mini model with item_tokens=True")
    return np.asarray(ids, dtype=np.int64)


def _corpus(source: Catalog | Sequence[str], n_prompts: int, seed: int) -> Iterable[str]:
    """Texts the tokenizer learns from: rendered items, tags, and sample prompts of every template."""
    if not isinstance(source, Catalog):
        yield from (str(t) for t in source)
        return

    cat = source
    n = len(cat)
    for i in range(n):
        yield prompts.render_item(cat, i)
        tags = cat.tags(i)
        if tags:
            yield ", ".join(tags)
    if n == 0:
        return
    rng = np.random.default_rng(seed)
    letters = [" " + chr(65 + k) for k in range(10)]
    for _ in range(n_prompts):
        hist = rng.integers(0, n, size=int(rng.integers(3, 21))).tolist()
        cands = rng.integers(0, n, size=10).tolist()
        yield prompts.recommend_prompt(cat, hist) + prompts.answer_text(cat, cands[:3])
        yield prompts.retrieval_prompt(cat, hist, "drama movies, comedy movies", cands)
        yield prompts.verbalizer_prompt(cat, hist, None, cands, letters) + letters[0]
        yield prompts.profile_prompt(cat, hist)


def build_mini(source: Catalog | Sequence[str], out_dir: str | Path, *, vocab_size: int = MiniConfig.vocab,
               item_tokens: bool = True, n_label_tokens: int = 64, n_layer: int = MiniConfig.layers,
               n_embd: int = MiniConfig.dim, n_head: int = MiniConfig.heads, intermediate_size: int | None = None, max_position: int = 1024,
               n_prompts: int = 300, seed: int = 0) -> Path:
    """Train the tokenizer, create a seeded random LLaMA, save both in Hugging Face format under ``out_dir``.

    ``source`` is a :class:`Catalog` (its items, tags and sample prompts train the tokenizer; with
    ``item_tokens`` every item gets a token ``item_token(i)``) or plain texts (no item tokens).
    Returns ``out_dir``. Deterministic for a given source and seed.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if n_embd % n_head or (n_embd // n_head) % 2:
        raise PalrError(f"n_embd={n_embd} must split into {n_head} heads of even width")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(source, n_prompts, seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    n_items = len(source) if isinstance(source, Catalog) and item_tokens else 0
    added = [item_token(i) for i in range(n_items)] + label_tokens(n_label_tokens)
    tok.add_tokens([AddedToken(t, single_word=False, normalized=False, special=False) for t in added])

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)
    hf_tok.save_pretrained(out)

    inter = intermediate_size or (8 * n_embd // 3 + 31) // 32 * 32  # LLaMA's 8/3 ratio, 32-aligned
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=n_embd, intermediate_size=inter,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                         max_position_embeddings=max_position, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"format": 1, "n_items": n_items, "item_tokens": bool(n_items), "n_label_tokens": n_label_tokens,
            "kind": source.kind if isinstance(source, Catalog) else None, "vocab_size": len(hf_tok),
            "bpe_vocab_size": vocab_size, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
            "intermediate_size": inter, "max_position": max_position, "seed": seed, "parameters": n_params}

    info["prompt_version"] = PROMPT_VERSION
    (out / MINI_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("mini model: %.2fM parameters, vocabulary %d (%d item tokens) -> %s",
             n_params / 1e6, len(hf_tok), n_items, out)
    return out


def read_mini_info(path: str | Path) -> dict[str, Any]:
    """The ``palr_mini.json`` written by :func:`build_mini`."""
    p = Path(path).expanduser() / MINI_INFO
    if not p.is_file():
        raise PalrError(f"{p.parent} is not a palr mini model (no {MINI_INFO}); "
                        "create one with `palr model create-mini --dataset NAME --out DIR`")
    return read_json(p)


def load_mini(path: str | Path, **options: Any) -> Any:
    """``mini:DIR``: the ``hf`` backend on a directory made by :func:`build_mini` (float32 on CPU by default)."""

    p = Path(path).expanduser()
    if not p.exists():
        raise PalrError(f"mini model directory {p} does not exist; create it with "
                        "`palr model create-mini --dataset NAME --out DIR`")
    info = read_mini_info(p)
    llm = HFLLM(p, **options)
    llm.name = f"mini:{p}"
    llm.info = info  # type: ignore[attr-defined]
    return llm
