"""Several processes: sharding arithmetic, and a real 2-process CPU launch (gloo) of `palr finetune` and
`palr evaluate` compared with one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from palr.core import distributed
from palr.data.synthetic import synthetic_raw

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("n, chunk", [(0, 4), (1, 4), (10, 1), (10, 4), (17, 5), (1000, 64)])
def test_shards_are_contiguous_whole_chunks_covering_every_index_once(monkeypatch: pytest.MonkeyPatch, n: int,
                                                                     chunk: int) -> None:
    for world in (1, 2, 3, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        parts = []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            parts.append(distributed.shard(n, chunk))
        assert np.concatenate(parts).tolist() == list(range(n))  # rank order = original order
        for p in parts[:-1]:
            assert len(p) % chunk == 0 or p[-1] == n - 1  # only the last block may end in a partial chunk
        sizes = [math.ceil(len(p) / chunk) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_one_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.init() and distributed.is_main()
    obj = {"a": np.arange(3)}
    [got] = distributed.gather(obj)  # one process: a list of its own object, on every process
    assert got is obj and distributed.gather(obj, everyone=True) == [obj]
    assert distributed.gather_arrays({"a": np.arange(3), "n": 2})["n"] == 2  # type: ignore[index]
    assert distributed.broadcast("x") == "x"


def write_csv(tmp: Path, n_users: int) -> str:
    raw = synthetic_raw(n_users, 60, min_len=6, max_len=12, seed=2)
    lines = ["user,item,timestamp"] + [f"{u},{i},{int(t)}" for u, i, t in zip(raw.users, raw.items, raw.times)]
    (tmp / "inter.csv").write_text("\n".join(lines) + "\n")
    return f"csv:{tmp / 'inter.csv'}"


def test_two_cpu_processes_shard_training_and_evaluate_like_one(tmp_path: Path) -> None:
    """torchrun-style launch, gloo, 2 processes: each trains on half of the records (half the steps), a crash after
    the first epoch's checkpoint resumes from it, the run directory is written by the main process only and is
    complete, the model loads and ranks, and the sharded evaluation equals one process's exactly (figures and
    predictions)."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import palr
    from palr.evaluate.palr import evaluate_palr_run
    from palr.rank.pipeline import PALR
    from palr.runs.store import read_run
    from palr.train.retriever import train_run

    batch = 16
    # 600 users: more than one ranking chunk (512), so both processes get users to evaluate
    retr = train_run(write_csv(tmp_path, 600), "itemknn", tmp_path / "retr", progress=False)
    run, spy = tmp_path / "palr", tmp_path / "spy"
    ft = ["finetune", str(retr), "--out", str(run), "--epochs", "2", "--batch-size", str(batch), "--positions", "1",
          "--candidates", "20", "--valid-users", "64", "--mini-dim", "32", "--mini-layers", "1"]

    def cand(n: int) -> list[str]:  # candidate generation: a retriever run's top-20 for every test user
        return ["evaluate", str(retr), "--out", str(tmp_path / f"rr{n}.json"), "--predictions",
                str(tmp_path / f"rp_retr{n}.jsonl"), "--candidates", "20", "--candidates-out", str(tmp_path / f"c{n}.jsonl")]

    ev = ["evaluate", str(run), "--out", str(tmp_path / "r2.json"), "--predictions", str(tmp_path / "p2.jsonl"),
          "--retriever-predictions", str(tmp_path / "rp2.jsonl")]
    src = str(Path(palr.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([src, str(HERE), os.environ.get("PYTHONPATH", "")])}
    # --standalone: a free port on localhost chosen by the rendezvous, so parallel runs never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(spy), "--", *ft, "--", *ev, "--", *cand(2)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # one complete run, written by the main process only
    read_run(run, "palr")
    assert {"run.json", "config.json", "metrics.json", "ranking.json", "instructions.jsonl", "llm", "base",
            "retriever"} <= {p.name for p in run.iterdir()}
    assert not (run / "checkpoints").exists()
    spies = [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert spies[0]["writes"] and not spies[1]["writes"], "only the main process writes"
    assert "palr.train.finetune.finish_run" in spies[0]["writes"]

    # each process computed its loss on its own half of the records: together all of them, about half each
    metrics = json.loads((run / "metrics.json").read_text())
    n_rows = metrics["train_records"]
    per_epoch = math.ceil(n_rows / (2 * batch))  # one process: ceil(n / batch)
    # resumed after the crash at the first checkpoint: only the second epoch was trained again
    assert spies[0]["interrupted_at"] == spies[1]["interrupted_at"] == per_epoch
    assert metrics["train_steps_per_process"] == 2 * per_epoch and len(metrics["valid_per_epoch"]) == 2
    assert metrics["pretrain_losses"] == []  # pretraining is in the checkpoint, not redone
    assert spies[0]["all_rows"] == spies[1]["all_rows"] and len(spies[0]["all_rows"]) == n_rows
    seen = [Counter(s["seen"]) for s in spies]
    assert set(seen[0]) | set(seen[1]) == set(spies[0]["all_rows"])
    assert len(set(seen[0]) & set(seen[1])) <= batch  # at most the padding of an uneven last batch
    assert abs(len(seen[0]) - len(seen[1])) <= batch
    assert sum(len(s["seen_before_crash"]) for s in spies) >= n_rows  # the first epoch, before the crash
    assert metrics["processes"] == 2

    # the saved model loads and ranks
    palr_run = PALR.load(run)
    rec = palr_run.recommend(user=palr_run.split.dataset.user_ids[0], k=5)
    assert len(rec.items) == 5 and not rec.notes

    # the sharded evaluation is exactly one process's (same threads, so the same arithmetic)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate_palr_run(run, out=tmp_path / "r1.json", predictions=tmp_path / "p1.jsonl",
                                retriever_predictions=tmp_path / "rp1.jsonl", progress=False)
    finally:
        torch.set_num_threads(threads)
    two = json.loads((tmp_path / "r2.json").read_text())
    assert one is not None and two["results"] == json.loads(json.dumps(one["results"]))
    assert two["timings"]["processes"] == 2 and two["results"]["PALR (end to end)"]["test"]["users"] == 600
    assert (tmp_path / "p1.jsonl").read_text() == (tmp_path / "p2.jsonl").read_text()
    assert (tmp_path / "rp1.jsonl").read_text() == (tmp_path / "rp2.jsonl").read_text()

    # candidate generation (a retriever run, --candidates): sharded == one process
    from palr.cli.main import app

    app(cand(1), standalone_mode=False)
    r1, r2 = (json.loads((tmp_path / f"rr{n}.json").read_text()) for n in (1, 2))
    assert r1["results"] == r2["results"] and r2["timings"]["processes"] == 2
    for name in ("c", "rp_retr"):
        assert (tmp_path / f"{name}1.jsonl").read_text() == (tmp_path / f"{name}2.jsonl").read_text()


def _options(command: str) -> list[str]:
    import typer

    from palr.cli.main import app

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return [o for p in cmd.params for o in p.opts if o.startswith("--")]


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_launchers_pass_every_option_through(command: str) -> None:
    """torchrun's and accelerate's parsers take abbreviations of their own options from the command's arguments;
    every option of `finetune`/`evaluate` but `--run` (hence the positional input run) reaches palr unchanged."""
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    args = [command, "runs/in"]
    for opt in _options(command):
        if opt != "--run":
            args += [opt, "1"]
    torchrun = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "palr.cli", *args])
    assert torchrun.training_script == "palr.cli" and torchrun.training_script_args == args
    acc = launch_command_parser().parse_args(["--multi_gpu", "--num_processes", "2", "-m", "palr.cli", *args])
    assert acc.training_script == "palr.cli" and acc.training_script_args == args
    with pytest.raises(SystemExit):  # the reason the input run is positional
        get_args_parser().parse_args(["-m", "palr.cli", command, "--run", "runs/in"])


def test_positional_and_option_input_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The input run may be positional (what launchers pass through) or --run; two different ones are an error."""
    import typer

    from palr.cli.flags import typer_command
    from palr.cli.main import main
    from palr.core.settings import FinetuneCommand

    seen: list[Path] = []
    app = typer.Typer()
    typer_command(app, "finetune", FinetuneCommand, lambda cfg: seen.append(cfg.run))
    typer_command(app, "other", FinetuneCommand, lambda cfg: None)
    for args in (["a"], ["--run", "a"], ["a", "--run", "a"]):
        app(["finetune", *args, "--out", "o"], standalone_mode=False)
    assert seen == [Path("a")] * 3
    for args, message in ((["a", "--run", "b"], "two values for --run: a and --run b; give one"),
                          ([], "missing --run")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", *args, "--out", "o"])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_scale_out_configs_load_and_the_readme_names_them() -> None:
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    root = HERE.parent
    ddp = load_config_from_file(str(root / "examples/scale_out/accelerate_2gpu.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes == 2
    ds = load_config_from_file(str(root / "examples/scale_out/deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 2
    readme = (root / "README.md").read_text()
    for name in ("accelerate_2gpu.yaml", "deepspeed_zero2.yaml", "torchrun --standalone --nproc_per_node 2"):
        assert name in readme
