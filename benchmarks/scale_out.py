"""Fine-tuning and evaluation with 1 vs N processes (torchrun, gloo on CPU): wall time, Trainer steps per process,
figures, and whether the sharded evaluation's predictions equal one process's.

    python benchmarks/scale_out.py --retriever-run RUN --out /tmp/scale [--processes 2] [--cores 0,1]
        [-- FINETUNE FLAGS ...]

``--cores`` pins every command to the same cores (``taskset``), so that N processes share what one process had:
one process gets as many threads as cores, each of N processes cores/N threads. Prints a markdown table and writes
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        sys.exit(f"{' '.join(cmd)} failed with exit code {rc}; see {log}")
    return time.perf_counter() - t0


def launch(n: int, cores: list[int] | None) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment for n processes (pinned to ``cores`` when given)."""
    threads = max(1, (len(cores) if cores else os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    prefix = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
    if n == 1:
        return [*prefix, sys.executable, "-m", "palr.cli"], env
    return [*prefix, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "palr.cli"], env


def measure(n: int, args: argparse.Namespace, cores: list[int] | None) -> dict[str, Any]:
    out = args.out / f"p{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd, env = launch(n, cores)
    ft_s = timed([*cmd, "finetune", str(args.retriever_run), "--out", str(out / "run"), *args.finetune],
                 env, out / "finetune.log")
    ev_s = timed([*cmd, "evaluate", str(out / "run"), "--out", str(out / "results.json"), "--predictions",
                  str(out / "predictions.jsonl")], env, out / "evaluate.log")
    m = json.loads((out / "run" / "metrics.json").read_text())
    doc = json.loads((out / "results.json").read_text())
    e2e = doc["results"]["PALR (end to end)"]["test"]
    return {"processes": n, "finetune_s": round(ft_s, 1), "evaluate_s": round(ev_s, 1),
            "steps_per_process": m["train_steps_per_process"], "records": m["train_records"],
            "valid_ndcg@10": m["valid"]["ndcg@10"], "test_ndcg@10": e2e["NDCG@10"], "test_hr@10": e2e["HR@10"],
            "ranking_users_per_s": round(e2e["users"] / doc["timings"]["ranking_s"], 1),
            "predictions": str(out / "predictions.jsonl")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retriever-run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--cores", default="", help="e.g. 0,1: pin every command to these cores")
    ap.add_argument("finetune", nargs=argparse.REMAINDER, help="-- then flags for palr finetune")
    args = ap.parse_args()
    args.finetune = [a for a in args.finetune if a != "--"]
    cores = [int(c) for c in args.cores.split(",") if c.strip()] or None
    rows = [measure(n, args, cores) for n in (1, args.processes)]
    same = Path(rows[0]["predictions"]).read_text() == Path(rows[1]["predictions"]).read_text()
    # the sharded evaluation of the same run: its predictions must equal one process's
    cmd, env = launch(args.processes, cores)
    shard = args.out / "sharded_eval_of_p1.jsonl"
    timed([*cmd, "evaluate", str(args.out / "p1" / "run"), "--out", str(args.out / "sharded_eval_of_p1.json"),
           "--predictions", str(shard)], env, args.out / "sharded_eval.log")
    identical = shard.read_text() == Path(rows[0]["predictions"]).read_text()
    summary = {"rows": rows, "sharded_evaluation_identical": identical, "runs_predict_alike": same,
               "cores": cores, "finetune_flags": args.finetune}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    keys = ["finetune_s", "steps_per_process", "valid_ndcg@10", "test_ndcg@10", "test_hr@10", "evaluate_s",
            "ranking_users_per_s"]
    print("| | " + " | ".join(f"{r['processes']} process(es)" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) and r[k] < 1 else str(r[k])
                                         for r in rows) + " |")
    print(f"sharded evaluation of the 1-process run identical to 1 process: {identical}")


if __name__ == "__main__":
    main()
