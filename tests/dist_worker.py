"""One process of test_distributed.py's launch: `palr finetune` then `palr evaluate` through the real command line,
with spies that record which training rows this process computed a loss on and which files it wrote.

Usage (under a launcher): dist_worker.py SPY_DIR -- finetune ARGS... -- evaluate ARGS... [-- COMMAND ARGS...]
The first command is first run with a crash right after the first checkpoint (every process), then again: the
second run resumes. Writes SPY_DIR/rank<R>.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def row_key(ids: list[int], target: int) -> str:
    return hashlib.sha1(json.dumps([ids, target]).encode()).hexdigest()[:16]


def main() -> None:
    import torch
    from transformers import TrainerCallback

    import palr.evaluate.palr as pipeline_mod
    import palr.train.finetune as run_mod
    import palr.train.lm as train_mod
    import palr.train.retriever as retrieval_mod
    from palr.cli.main import app
    from palr.core import distributed

    torch.set_num_threads(1)
    spy_dir = Path(sys.argv[1])
    commands: list[list[str]] = []
    for arg in sys.argv[2:]:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    spy: dict[str, Any] = {"rank": distributed.rank(), "world": distributed.world_size(), "seen": [], "all_rows": [],
                           "writes": [], "interrupted_at": None}

    loss = train_mod.palr_loss

    def spy_loss(model: Any, batch: dict[str, Any], listwise_weight: float) -> Any:
        if model.training:
            for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["target"]):
                if int(target) >= 0:  # instruction rows (pretraining rows have no target)
                    spy["seen"].append(row_key(ids[mask.bool()].tolist(), int(target)))
        return loss(model, batch, listwise_weight)

    encode = run_mod.encode_records

    def spy_encode(*a: Any, **kw: Any) -> Any:
        rows = encode(*a, **kw)
        spy["all_rows"] = [row_key(r["input_ids"], r["target"]) for r in rows]
        return rows

    def writes(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            spy["writes"].append(f"{module.__name__}.{name}")
            return real(*a, **kw)

        setattr(module, name, wrapper)

    train_mod.palr_loss = spy_loss
    run_mod.encode_records = spy_encode
    for module, name in [(run_mod, "begin_run"), (run_mod.RankingConfig, "write"), (run_mod, "write_jsonl"),
                         (run_mod, "finish_run"), (run_mod, "link_snapshot"), (pipeline_mod, "write_json"),
                         (retrieval_mod, "write_predictions"), (retrieval_mod, "write_candidates"),
                         (retrieval_mod, "write_json")]:
        writes(module, name)
    class Crash(Exception):
        pass

    class CrashAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            raise Crash(state.global_step)

    real_trainer_class = run_mod._trainer_class

    def crashing_trainer_class() -> Any:
        cls = real_trainer_class()

        class Crashing(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.add_callback(CrashAfterFirstCheckpoint())

        return Crashing

    run_mod._trainer_class = crashing_trainer_class
    try:
        app(commands[0], standalone_mode=False)
    except Crash as e:
        spy["interrupted_at"] = e.args[0]
    run_mod._trainer_class = real_trainer_class
    distributed.barrier()  # the main process has written the checkpoint (a real restart comes after the crash)
    spy["seen_before_crash"], spy["seen"] = spy["seen"], []
    for cmd in commands:
        app(cmd, standalone_mode=False)
    spy_dir.mkdir(parents=True, exist_ok=True)
    (spy_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(spy))


if __name__ == "__main__":
    main()
