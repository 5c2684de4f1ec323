"""One typed definition per command: flags, --config files and saved args all come from palr.config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from palr.cli.main import COMMANDS, app
from palr.core import settings as C
from palr.core.errors import ConfigError
from palr.core.options import build, convert, flat, options


@pytest.mark.parametrize("entry", COMMANDS, ids=lambda e: e[1])
def test_every_field_is_a_flag_with_help(entry: tuple) -> None:
    """Each command's flags are exactly its dataclass's options (nothing retyped by hand in cli.py)."""
    parent, name, cls, _ = entry
    click_cmd = typer.main.get_command(parent).commands[name]  # type: ignore[attr-defined]
    params = {p.name for p in click_cmd.params if not p.name.endswith("__arg")}  # positional forms of --run
    assert params == {o.name for o in options(cls) if o.cli} | {"config_file"}
    for o in options(cls):
        assert o.help or not o.cli, f"{cls.__name__}.{o.name} has no help"


def test_flags_override_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\nlora: [4, 8]\ntasks: verbalizer,recommend\nmini-dim: 32\n"
                 "positions_per_user: 3\nrun: r\nout: o\n")
    cfg = build(C.FinetuneCommand, {"epochs": "5"}, f)
    assert cfg.train.epochs == 5.0 and cfg.train.lora == (4, 8) and cfg.train.mini.dim == 32
    assert cfg.train.tasks == ("verbalizer", "recommend") and cfg.train.examples.positions_per_user == 3
    assert cfg.train.batch_size == 32  # the field default
    # TOML and JSON give the same
    (tmp_path / "c.toml").write_text('epochs = 2\nlora = [4, 8]\ntasks = ["verbalizer", "recommend"]\nmini_dim = 32\n'
                                     'positions_per_user = 3\nrun = "r"\nout = "o"\n')
    assert build(C.FinetuneCommand, {"epochs": "5"}, tmp_path / "c.toml") == cfg
    (tmp_path / "c.json").write_text(json.dumps(flat(cfg)))
    assert build(C.FinetuneCommand, None, tmp_path / "c.json") == cfg


def test_saved_args_read_back(tmp_path: Path) -> None:
    cfg = build(C.TrainConfig, {"dataset": "ml-100k", "out": "runs/x", "retriever": "itemknn",
                                "params": ["neighbours=50", "decay=0.5"], "seed": "3"})
    assert cfg.params == {"neighbours": 50, "decay": 0.5} and cfg.seed == 3
    doc = {**flat(cfg), "_dataset_fingerprint": "abc"}  # notes (keys starting with _) are skipped
    assert build(C.TrainConfig, None, doc) == cfg


@pytest.mark.parametrize("args, message", [
    (["train", "-d", "ml-100k", "-o", "x", "-r", "itemknn", "-p", "nieghbours=50"],
     ("--param nieghbours=50 (itemknn): unknown key 'nieghbours' (did you mean 'neighbours'?); "
      "valid keys: decay, neighbours, recent, sequential, shrink")),
    (["train", "-d", "ml-100k", "-o", "x", "-r", "sasrec", "-p", "hidden=big"],
     "--param hidden (sasrec): expected an integer, got 'big'"),
    (["train", "-d", "ml-100k", "-o", "x", "-r", "sasrec", "-p", "epochs"], "--param expects key=value, got 'epochs'"),
    (["train", "-d", "ml-100k", "-o", "x", "-r", "nope"], "unknown retriever 'nope'; known: als, bpr"),
    (["evaluate", "-d", "ml-100k", "-r", "sasrec", "-r", "itemknn", "-p", "epohs=1"],
     "unknown key 'epohs' (did you mean 'epochs'?)"),
    (["finetune", "--run", "a", "--out", "b", "--lora", "8"],
     "--lora: expected 2 comma-separated values (an integer, an integer), got '8'"),
    (["finetune", "--run", "a", "--out", "b", "--epochs", "many"], "--epochs: expected a number, got 'many'"),
    (["finetune", "--run", "a", "--out", "b", "--tasks", "verbaliser"], "--tasks: unknown task(s) ['verbaliser']"),
    (["finetune", "--run", "runs/a", "--out", "runs/a/"], "--out runs/a is the retriever run itself"),
    (["recommend", "--run", "r", "--mode", "creative"], "--mode: expected one of 'verbalizer', 'generative'"),
    (["train", "-o", "x"], "missing --dataset"),
    (["train", "-d", "ml-100k"], "missing --out"),
])
def test_bad_values_are_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from palr.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_config_file_errors_name_file_and_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("retriever: itemknn\nparms: {neighbours: 5}\n")
    with pytest.raises(ConfigError, match=r"c.yaml \(palr train\): unknown key 'parms' \(did you mean 'params'\?\); "
                                          r"valid keys: data_dir, dataset, .*params"):
        build(C.TrainConfig, {"dataset": "ml-100k", "out": "x"}, f, command="train")
    f.write_text("seed: abc\n")
    with pytest.raises(ConfigError, match="c.yaml: seed: expected an integer, got 'abc'"):
        build(C.TrainConfig, {"dataset": "ml-100k", "out": "x"}, f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(C.TrainConfig, {}, f)
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml, \.toml or \.json"):
        build(C.TrainConfig, {}, tmp_path / "c.ini")


def test_convert_types() -> None:
    assert convert(int, "3", "--k") == 3 and convert(float, 2, "x") == 2.0 and convert(bool, "false", "x") is False
    assert convert(int | None, "none", "x") is None and convert(tuple[int, int], "8,16", "x") == (8, 16)
    assert convert(list[str], ["a,b", "c"], "x") == ["a", "b", "c"]
    assert convert(dict[str, object], ["a=1", "b=x"], "x") == {"a": 1, "b": "x"}
    for t, v in ((int, "1.5"), (int, True), (bool, "maybe"), (tuple[int, int], "8")):
        with pytest.raises(ConfigError, match="x: expected"):
            convert(t, v, "x")


def test_mini_defaults_have_one_definition() -> None:
    """`palr model create-mini` and `palr finetune` build the same mini model by default."""
    made = C.CreateMiniConfig(out=Path("m"), data=C.DataSpec("ml-100k"))
    assert made.mini == C.FinetuneConfig().mini == C.MiniConfig()
    fields = {f.name for f in dataclasses.fields(C.FinetuneConfig)}
    assert "mini" in fields and not any(f.startswith("mini_") for f in fields)


def test_version_and_help() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("palr ")
    res = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert "--config" in res.output and "(default: sasrec)" in res.output


def test_retriever_help_names_the_registry() -> None:
    from palr.core.settings import RETRIEVER_HELP
    from palr.retrieval.base import REGISTRY

    assert RETRIEVER_HELP.split(", ") == list(REGISTRY)
