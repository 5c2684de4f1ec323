"""Constrained decoding over a candidate list: a prefix trie of the candidates' token sequences.

The state machine reads the tokens generated so far: item, separator, item, ... Each position may only
continue a still-unnamed candidate; after ``n`` items (or when none is left) only EOS is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class CandidateTrie:
    seqs: list[list[int]]  # token ids of each candidate's rendering
    sep: list[int]  # separator token ids between items ([] for item tokens)
    eos: int
    n: int

    @classmethod
    def build(cls, tokenizer: Any, rendered: Sequence[str], sep: str, n: int) -> CandidateTrie:
        seqs = [list(tokenizer.encode(" " + r if sep else r, add_special_tokens=False)) for r in rendered]
        sep_ids = list(tokenizer.encode(sep, add_special_tokens=False)) if sep else []
        return cls(seqs, sep_ids, int(tokenizer.eos_token_id), min(n, len(seqs)))

    def max_tokens(self) -> int:
        longest = sorted((len(s) for s in self.seqs), reverse=True)[: self.n]
        return sum(longest) + len(self.sep) * self.n + 1

    def _walk(self, ids: list[int]) -> tuple[list[int], list[int], int]:
        """Parse ``ids`` -> (named candidate indices, current partial tokens, invalid token count)."""
        named: list[int] = []
        partial: list[int] = []
        pending_sep = 0
        bad = 0
        for t in ids:
            if t == self.eos:
                break
            if pending_sep < len(self.sep) and named and not partial and t == self.sep[pending_sep]:
                pending_sep += 1
                continue
            partial.append(t)
            matches = [k for k, s in enumerate(self.seqs) if k not in named and s[: len(partial)] == partial]
            if not matches:
                bad += 1
                partial = []
                continue
            done = [k for k in matches if len(self.seqs[k]) == len(partial)]
            if done:
                named.append(done[0])
                partial = []
                pending_sep = 0
        return named, partial, bad

    def allowed(self, ids: list[int]) -> list[int]:
        named, partial, _ = self._walk(ids)
        if len(named) >= self.n:
            return [self.eos]
        if named and not partial and self.sep:
            emitted = self._sep_emitted(ids)
            if emitted < len(self.sep):
                return [self.sep[emitted]]
        nxt = {s[len(partial)] for k, s in enumerate(self.seqs)
               if k not in named and len(s) > len(partial) and s[: len(partial)] == partial}
        return sorted(nxt) or [self.eos]

    def _sep_emitted(self, ids: list[int]) -> int:
        """Separator tokens emitted since the last completed item."""
        for m in range(len(self.sep), 0, -1):
            if len(ids) >= m and ids[-m:] == self.sep[:m]:
                return m
        return 0

    def parse(self, ids: list[int]) -> tuple[list[int], int]:
        """Named candidate indices (in order) and the count of tokens that named nothing."""
        named, _, bad = self._walk(ids)
        return named, bad
