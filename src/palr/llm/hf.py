"""The ``hf`` backend: any Hugging Face causal LM (local directory or hub id), optional LoRA adapter.

Batches are left-padded with explicit position ids, so a prompt scores the same alone or in a batch.
Scoring runs the LM head on the last position(s) only (``logits_to_keep``); generation uses the KV cache.
A model whose tokenizer has a chat template (instruct models) gets every prompt through it (``chat="auto"``):
the prompt's body is the user's turn and its last line (the cue, ``Answer:``) opens the model's turn, so
answer labels are scored right after the cue; ``chat="off"`` sends raw text (what fine-tuned runs were
trained on).
``transformers``/``peft`` are imported when a model is loaded, never at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import PalrError
from palr.llm.prompts import split_cue
from palr.llm.protocol import label_token_ids

log = logging.getLogger(__name__)

__all__ = ["HFLLM"]

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def looks_local(target: str) -> bool:
    """A path (never a hub id): starts with . / ~, exists, or has more than one slash."""
    return target.startswith((".", "/", "~")) or Path(target).expanduser().exists() or target.count("/") > 1


class HFLLM:
    """A causal LM from ``transformers`` behind the :class:`palr.llm.protocol.LLM` protocol.

    Args:
        path: local model directory or hub id (a hub id may download; a local-looking path never does).
        dtype: "auto", "float32", "bfloat16" or "float16" (default float32 on CPU, bfloat16 on CUDA).
        device: "cpu", "cuda", "cuda:1", "mps" or "auto" (CUDA when available).
        adapter: a PEFT/LoRA adapter directory applied on top of the base model.
        batch_size: prompts per forward pass (multi-token scoring batches prompt x label pairs).
        chat: "auto" (the chat template when the tokenizer has one), "on" or "off".
        offline: a hub id is read from the local Hugging Face cache only, never downloaded (a run file named it).

    ``.model`` and ``.tokenizer`` are the transformers objects (left padding, pad token always set),
    for fine-tuning code.
    """

    def __init__(self, path: str | Path, *, dtype: str = "auto", device: str = "auto",
                 adapter: str | Path | None = None, batch_size: int = 8,
                 trust_remote_code: bool = False, chat: str | bool = "auto", offline: bool = False) -> None:
        import torch
        import transformers

        target = str(path)
        local = looks_local(target)
        if local:
            p = Path(target).expanduser()
            if not p.exists():
                raise PalrError(f"model path {p} does not exist")
            if not (p / "config.json").is_file():
                raise PalrError(f"{p} is not a Hugging Face model directory (no config.json)")
            target = str(p)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if dtype not in _DTYPES:
            raise PalrError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
        torch_dtype = getattr(torch, _DTYPES[dtype])
        try:
            if offline:
                local = True
            config = transformers.AutoConfig.from_pretrained(target, local_files_only=local,
                                                             trust_remote_code=trust_remote_code)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                target, local_files_only=local, trust_remote_code=trust_remote_code)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                target, config=config, dtype=torch_dtype, local_files_only=local,
                trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            if offline and not looks_local(target):
                raise PalrError(f"the run names the base model {target!r}, which is not in the local Hugging Face "
                                "cache; palr does not download a model a run file names: download it yourself "
                                f"(huggingface-cli download {target}) and retry") from None
            raise PalrError(f"cannot load a causal language model from {target!r}: {' '.join(str(e).split())[:300]}") from e
        except Exception as e:  # safetensors' SafetensorError and other damaged-file errors: one line naming it
            if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "DecodeError", "UnpicklingError"):
                raise
            raise PalrError(f"{target}: damaged model files ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if adapter is not None:
            model = self._apply_adapter(model, Path(adapter).expanduser())
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = f"hf:{target}" + (f"+{adapter}" if adapter else "")
        self.batch_size = max(1, int(batch_size))
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token_id is None:
            raise PalrError(f"{target}: the tokenizer has no pad, eos or unk token to pad batches with")
        self.chat = self._use_chat(chat)
        log.info("loaded %s (%s, %s, %.1fM parameters)", self.name, dtype, device,
                 sum(p.numel() for p in self.model.parameters()) / 1e6)

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, *, name: str = "in-memory", batch_size: int = 8) -> HFLLM:
        """Wrap an already loaded model and tokenizer (e.g. during fine-tuning) without reloading."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = next(model.parameters()).device
        self.batch_size = max(1, int(batch_size))
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat = False
        return self

    def _use_chat(self, chat: str | bool) -> bool:
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if chat in (True, "on"):
            if not has:
                raise PalrError(f"{self.name}: chat='on' but the tokenizer has no chat template")
            return True
        if chat in (False, "off"):
            return False
        if chat != "auto":
            raise PalrError(f"chat must be 'auto', 'on' or 'off', not {chat!r}")
        return has

    def wrap(self, prompt: str) -> str:
        """The text the model reads for ``prompt``: itself, or its chat-template form (see the module doc)."""
        if not self.chat:
            return prompt
        body, cue = split_cue(prompt)
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):  # encode() adds it again
            text = text[len(bos):]
        return text + cue

    @staticmethod
    def _apply_adapter(model: Any, adapter: Path) -> Any:
        if not (adapter / "adapter_config.json").is_file():
            raise PalrError(f"adapter {adapter} has no adapter_config.json (not a PEFT adapter directory)")
        try:
            from peft import PeftModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise PalrError("LoRA adapters need peft: pip install 'palr[llm]'") from e
        return PeftModel.from_pretrained(model, str(adapter))

    # ------------------------------------------------------------------------ batching
    def _batch(self, ids: Sequence[Sequence[int]]) -> tuple[Any, Any, Any]:
        """Left-pad token id lists -> (input_ids, attention_mask, position_ids), each (B, T)."""
        import torch

        if any(len(x) == 0 for x in ids):
            raise PalrError("cannot score an empty prompt with a tokenizer that adds no BOS token")
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
            mask[row, width - len(x):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), position_ids.to(self.device)

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(self.tokenizer.encode(self.wrap(p), add_special_tokens=True)) for p in prompts]

    def _last_logits(self, ids: Sequence[Sequence[int]], keep: int) -> Any:
        """Float32 logits of the last ``keep`` positions: (B, keep, V); the LM head runs on those only."""
        import torch

        input_ids, mask, pos = self._batch(ids)
        with torch.inference_mode():
            try:
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                 logits_to_keep=keep, use_cache=False)
            except TypeError:  # older architectures without logits_to_keep
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.logits[:, -keep:, :].float()

    # ------------------------------------------------------------------------ scoring
    def next_token_logprobs(self, prompts: list[str]) -> np.ndarray:
        """(B, V) log-probabilities of the next token after each prompt (one forward pass per batch)."""
        import torch

        rows = []
        ids = self._encode(prompts)
        for sl in _chunks(len(ids), self.batch_size):
            logits = self._last_logits(ids[sl], keep=1)[:, -1, :]  # (b, V)
            rows.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(self.tokenizer)), np.float32)

    def score_choices(self, prompts: list[str], labels: list[str]) -> np.ndarray:
        """(B, L) log p(label | prompt); exact for multi-token labels (teacher forcing, summed)."""

        if not labels:
            return np.zeros((len(prompts), 0), dtype=np.float32)
        label_ids = label_token_ids(self.tokenizer, labels)
        if all(len(x) == 1 for x in label_ids):
            cols = np.array([x[0] for x in label_ids])
            return self.next_token_logprobs(prompts)[:, cols]
        per_token = self._pair_logprobs(self._encode(prompts), label_ids)
        return np.array([[sum(x) for x in row] for row in per_token], dtype=np.float32)

    def _pair_logprobs(self, prompt_ids: list[list[int]], label_ids: list[list[int]]) -> list[list[list[float]]]:
        """[prompt][label] -> log-probability of each label token (teacher forcing, batched pairs)."""
        import torch

        pairs = [(b, j) for b in range(len(prompt_ids)) for j in range(len(label_ids))]
        out: list[list[list[float]]] = [[[] for _ in label_ids] for _ in prompt_ids]
        lmax = max(len(x) for x in label_ids)
        for sl in _chunks(len(pairs), self.batch_size):
            chunk = pairs[sl]
            seqs = [prompt_ids[b] + label_ids[j] for b, j in chunk]
            # Right-aligned sequences: label token k of a label of length m sits at T-m+k and is predicted by
            # position T-1-m+k, i.e. index lmax-m+k of the last lmax+1 positions kept below.
            logp = torch.log_softmax(self._last_logits(seqs, keep=lmax + 1), dim=-1)  # (b, lmax+1, V)
            for row, (b, j) in enumerate(chunk):
                m = len(label_ids[j])
                idx = torch.arange(lmax - m, lmax)
                toks = torch.tensor(label_ids[j], device=logp.device)
                out[b][j] = logp[row, idx, toks].tolist()
        return out

    def token_logprobs(self, prompt: str, continuations: list[str]) -> list[list[tuple[str, float]]]:
        """Per continuation, its tokens (text) and their log-probabilities after ``prompt`` (tokenized apart,
        as :meth:`score_choices` does): what palr's server returns for an echo request."""
        ids = label_token_ids(self.tokenizer, continuations)
        if all(len(x) == 1 for x in ids):
            lp = self.next_token_logprobs([prompt])[0]
            per = [[float(lp[x[0]])] for x in ids]
        else:
            per = self._pair_logprobs(self._encode([prompt]), ids)[0]
        return [[(self.tokenizer.decode([t]), v) for t, v in zip(x, vals)] for x, vals in zip(ids, per)]

    # ------------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, *,
                 prefix_allowed_tokens_fn: Callable[[int, Any], list[int]] | None = None,
                 seed: int | None = None, skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        """Greedy (temperature 0) or sampled continuations, KV-cached, batched with left padding.

        ``prefix_allowed_tokens_fn(prompt_index, generated_ids)`` is passed to transformers' constrained
        decoding, with two conveniences: ``prompt_index`` indexes ``prompts`` (not the internal batch) and
        ``generated_ids`` (1-D LongTensor) holds only the tokens generated so far, without the prompt.
        Extra keywords (``num_beams``, ``num_return_sequences``, ...) go to ``model.generate``; with
        ``num_return_sequences=n`` the result holds n texts per prompt, prompt-major.
        """
        texts, _ = self._generate(prompts, max_new_tokens, temperature, stop, prefix_allowed_tokens_fn,
                                  seed, skip_special_tokens, want_scores=False, **kw)
        return texts

    def generate_with_logprobs(self, prompts: list[str], max_new_tokens: int = 16, temperature: float = 0.0,
                               stop: list[str] | None = None, top_k: int = 5,
                               **kw: Any) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Texts plus, per generated token, ``{"token", "logprob", "top": [(token, logprob), ...]}``.

        Log-probabilities are those of the model's raw distribution (what an OpenAI server reports).
        """
        return self._generate(prompts, max_new_tokens, temperature, stop, None, kw.pop("seed", None), True,
                              want_scores=True, top_k=top_k, **kw)

    def _generate(self, prompts: list[str], max_new_tokens: int, temperature: float, stop: list[str] | None,
                  allowed: Callable[[int, Any], list[int]] | None, seed: int | None, skip_special: bool,
                  want_scores: bool, top_k: int = 5, **kw: Any) -> tuple[list[str], list[list[dict[str, Any]]]]:
        import torch

        tok = self.tokenizer
        ids = self._encode(prompts)
        texts: list[str] = []
        details: list[list[dict[str, Any]]] = []
        if seed is not None:
            torch.manual_seed(seed)
        sampling = temperature > 0
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.model.generation_config.eos_token_id
        for sl in _chunks(len(ids), self.batch_size):
            input_ids, mask, _ = self._batch(ids[sl])
            width = input_ids.shape[1]
            fn = None
            if allowed is not None:
                offset = sl.start

                def fn(batch_id: int, sent: Any, _o: int = offset, _w: int = width) -> list[int]:
                    return allowed(_o + batch_id, sent[_w:])
            gen_kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling, "use_cache": True,
                                          "pad_token_id": tok.pad_token_id, "eos_token_id": eos,
                                          "prefix_allowed_tokens_fn": fn}
            if sampling:
                gen_kw["temperature"] = temperature
            else:
                gen_kw.update(temperature=None, top_p=None, top_k=None)
            if stop and allowed is None:  # stop decoding at a stop string (the text is cut there below too)
                gen_kw.update(stop_strings=list(stop), tokenizer=tok)
            if want_scores:
                gen_kw.update(output_logits=True, return_dict_in_generate=True)
            gen_kw.update(kw)
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, **gen_kw)
            seqs = out.sequences if want_scores else out
            new = seqs[:, width:]
            for row in range(new.shape[0]):
                toks = new[row].tolist()
                eos_set = set(eos) if isinstance(eos, list) else {eos}
                end = next((k for k, t in enumerate(toks) if t in eos_set or t == tok.pad_token_id), len(toks))
                text = tok.decode(toks[:end], skip_special_tokens=skip_special)
                cut_text = _cut_at_stop(text, stop)
                texts.append(cut_text)
                if want_scores:  # steps up to the end of the cut text; the eos step too, at least one step
                    details.append(self._token_details(out.logits, row, toks[:end + 1], cut_text, top_k))
        return texts, details

    def _token_details(self, logits: Sequence[Any], row: int, toks: list[int], text: str,
                       top_k: int) -> list[dict[str, Any]]:
        import torch

        tok = self.tokenizer
        items: list[dict[str, Any]] = []
        produced = ""
        for step, t in enumerate(toks):
            if step and len(produced) >= len(text):
                break
            logp = torch.log_softmax(logits[step][row].float(), dim=-1)
            vals, idx = logp.topk(min(top_k, logp.shape[-1])) if top_k > 0 else (logp[:0], logp[:0].long())
            piece = tok.decode([t])
            produced += piece
            items.append({"token": piece, "logprob": float(logp[t]),
                          "top": [(tok.decode([int(i)]), float(v)) for v, i in zip(vals, idx)]})
        return items


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string."""
    if not stop:
        return text
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, offline: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a standalone model directory (weights + tokenizer) at
    ``out``, for servers that take a plain model (vLLM, ``palr model serve``). Written to a sibling, then renamed."""
    import os
    import shutil

    llm = HFLLM(base, adapter=adapter, device="cpu", dtype="float32", offline=offline)
    merged = llm.model.merge_and_unload()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    llm.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
