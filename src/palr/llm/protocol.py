"""The LLM plug point: the protocol every backend implements (generate, score_choices) and the label helpers
(single-token candidate labels in a tokenizer). Backends are built from specs by :mod:`palr.llm.registry`."""

from __future__ import annotations

import string
from typing import Any, Protocol, runtime_checkable

import numpy as np

from palr.core.errors import PalrError


@runtime_checkable
class LLM(Protocol):
    """A language model palr can prompt. Both methods are batched and deterministic at temperature 0."""

    name: str

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, **kw: Any) -> list[str]:
        """Continue each prompt; return only the new text, cut before the first ``stop`` string."""
        ...

    def score_choices(self, prompts: list[str], labels: list[str]) -> np.ndarray:
        """(B, L) float array: log p(label_j | prompt_i), the label taken as the continuation of the prompt.

        Prompt and label are tokenized separately and their ids concatenated, so a label meant to follow
        a space must carry it (``" A"``). A one-token label costs nothing beyond the prompt's forward pass.
        """
        ...


# ---------------------------------------------------------------------------- label helpers
def candidate_labels() -> list[str]:
    """A..Z, a..z, 0..99, then AA..ZZ: the orders a verbalizer label set is drawn from."""
    two = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
    return (list(string.ascii_uppercase) + list(string.ascii_lowercase)
            + [str(k) for k in range(100)] + two)


def label_token_ids(tokenizer: Any, labels: list[str]) -> list[list[int]]:
    """Token ids of each label as a continuation (no special tokens added)."""
    out = [list(tokenizer.encode(label, add_special_tokens=False)) for label in labels]
    for label, ids in zip(labels, out):
        if not ids:
            raise PalrError(f"label {label!r} encodes to no tokens")
    return out


def single_token_labels(tokenizer: Any, n: int, prefix: str = " ",
                        candidates: list[str] | None = None) -> list[str]:
    """``n`` labels (``prefix`` + A, B, ..., then a.., 0.., AA..) that each encode to ONE distinct token.

    With such a label set :meth:`LLM.score_choices` reads a single next-token distribution (the LlamaRec
    verbalizer). Tries ``prefix`` first and, if too few qualify, no prefix. Raises PalrError if fewer than
    ``n`` exist.
    """
    pool = candidates if candidates is not None else candidate_labels()
    best: list[str] = []
    for pre in dict.fromkeys([prefix, ""]):
        chosen: list[str] = []
        seen: set[int] = set()
        for raw in pool:
            ids = tokenizer.encode(pre + raw, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in seen:
                seen.add(ids[0])
                chosen.append(pre + raw)
                if len(chosen) == n:
                    return chosen
        best = max(best, chosen, key=len)
    raise PalrError(f"the tokenizer has only {len(best)} single-token labels of the {n} asked for; "
                    "use fewer candidates, or multi-token labels (scored exactly, more slowly)")
