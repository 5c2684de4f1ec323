"""The `palr` command line: flags -> one library call each. Errors become a message and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from palr.errors import PalrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PALR: profile, retrieve and rank with LLMs, evaluated honestly.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: download, statistics.")
app.add_typer(data_app, name="data")
console = Console()

DatasetOpt = typer.Option(..., "--dataset", "-d", help="ml-100k, ml-1m, ml-latest-small, amazon-<category>, csv:PATH")
DataDirOpt = typer.Option(None, "--data-dir", help="Data directory (default: $PALR_DATA_DIR, else ~/.cache/palr/data)")
# csv:PATH data sets (CSV or Parquet): which columns hold what, and an optional item file
UserColOpt = typer.Option("user", "--user-col", help="csv:PATH: the user id column.")
ItemColOpt = typer.Option("item", "--item-col", help="csv:PATH: the item id column.")
TimeColOpt = typer.Option("timestamp", "--time-col", help="csv:PATH: the timestamp column ('' = the file is in order).")
ItemsFileOpt = typer.Option(None, "--items-file", help="csv:PATH: item CSV (id, title, attribute columns).")


def user_file_options(user_col: str, item_col: str, time_col: str, items_file: Path | None) -> dict[str, object]:
    return {"user_col": user_col, "item_col": item_col, "time_col": time_col or None, "items_file": items_file}


def parse_params(pairs: list[str] | None) -> dict[str, object]:
    """--param key=value pairs -> dict with JSON-typed values (numbers, booleans) where they parse."""
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise PalrError(f"--param expects key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------- data
@data_app.command("stats")
def data_stats(dataset: str = DatasetOpt, data_dir: Path | None = DataDirOpt,
               as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
               user_col: str = UserColOpt, item_col: str = ItemColOpt, time_col: str = TimeColOpt,
               items_file: Path | None = ItemsFileOpt) -> None:
    """Users, items and interactions after the canonical preprocessing."""
    from palr.data import load_dataset

    stats = load_dataset(dataset, data_dir, **user_file_options(user_col, item_col, time_col, items_file)).stats()
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    console.print(f"[bold]{stats['dataset']}[/bold]: {stats['users']:,} users, {stats['items']:,} items, "
                  f"{stats['interactions']:,} interactions (density {stats['density']:.4%}); "
                  f"sequence length min {stats['sequence_length']['min']} / mean {stats['sequence_length']['mean']} "
                  f"/ max {stats['sequence_length']['max']}")


@data_app.command("download")
def data_download(name: str = typer.Argument(..., help="ml-100k, ml-1m, ml-latest-small or amazon-<category>"),
                  data_dir: Path | None = DataDirOpt,
                  timeout: float = typer.Option(10.0, help="Seconds before giving up on a connection.")) -> None:
    """Download a data set from its original source (GroupLens, UCSD) and check sha256 sums."""
    from palr.data import data_dir as resolve
    from palr.data.download import download

    sums = download(name, resolve(data_dir), timeout)
    for fname, digest in sums.items():
        console.print(f"{fname}  sha256 {digest}")


# ---------------------------------------------------------------------------- retrieval
@app.command("train")
def train(dataset: str = DatasetOpt,
          retriever: str = typer.Option("sasrec", "--retriever", "-r", help="popularity, itemknn, sasrec, als, bpr, text"),
          out: Path = typer.Option(..., "--out", "-o", help="Run directory to create."),
          seed: int = typer.Option(0, help="Random seed."),
          param: list[str] | None = typer.Option(None, "--param", "-p", help="Hyper-parameter key=value (repeatable)."),
          data_dir: Path | None = DataDirOpt) -> None:
    """Train a retriever and save it as a run directory."""
    from palr.retrieval.train import train_run

    run = train_run(dataset, retriever, out, params=parse_params(param), seed=seed, data_dir=data_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    console.print(f"saved run {run}; valid NDCG@10 {metrics['valid']['NDCG@10']:.4f} HR@10 {metrics['valid']['HR@10']:.4f}")


@app.command("evaluate")
def evaluate(dataset: str | None = typer.Option(None, "--dataset", "-d", help="Data set (with --retriever)."),
             retriever: list[str] | None = typer.Option(None, "--retriever", "-r", help="Retriever(s) fitted on the train split."),
             run: Path | None = typer.Option(None, "--run", help="A saved run directory (no retraining)."),
             out: Path = typer.Option(Path("results.json"), "--out", "-o", help="results.json path."),
             predictions: Path | None = typer.Option(None, "--predictions", help="Test predictions JSONL."),
             retriever_predictions: Path | None = typer.Option(None, "--retriever-predictions",
                                                                   help="(PALR runs) the retriever's own predictions."),
             candidates: int = typer.Option(0, "--candidates", help="Also write each test user's top-N and its recall."),
             candidates_out: Path | None = typer.Option(None, "--candidates-out", help="Where to write candidates JSONL."),
             seed: int = typer.Option(0, help="Random seed for retrievers fitted here."),
             data_dir: Path | None = DataDirOpt,
             user_col: str = UserColOpt, item_col: str = ItemColOpt, time_col: str = TimeColOpt,
             items_file: Path | None = ItemsFileOpt) -> None:
    """Full-ranking leave-one-out evaluation on valid and test; writes results.json and predictions."""
    from palr.evaluation import results_table

    if run is not None:
        from palr.runs import read_run

        kind = read_run(run)["kind"]
        if kind == "palr":
            from palr.pipeline import evaluate_palr_run

            doc = evaluate_palr_run(run, out=out, predictions=predictions, retriever_predictions=retriever_predictions,
                                    data_dir=data_dir)
        else:
            from palr.retrieval.train import evaluate_models, load_run

            cfg, model, split = load_run(run, data_dir)
            cands_path = candidates_out or (out.with_name("candidates.jsonl") if candidates else None)
            doc = evaluate_models({cfg["config"]["retriever"]: model}, split, out, predictions, candidates, cands_path)
    else:
        if not dataset or not retriever:
            raise PalrError("give --run DIR, or --dataset NAME with --retriever NAME")
        from palr.data import load_split
        from palr.retrieval.train import evaluate_models, fit_retriever

        split = load_split(dataset, data_dir, **user_file_options(user_col, item_col, time_col, items_file))
        models, timings = {}, {}
        for name in retriever:
            models[name], fit_s = fit_retriever(name, split, seed=seed, progress=True)
            timings[f"{name}.fit_s"] = round(fit_s, 3)
        cands_path = candidates_out or (out.with_name("candidates.jsonl") if candidates else None)
        doc = evaluate_models(models, split, out, predictions, candidates, cands_path, timings=timings)
    console.print(results_table(doc["results"], "test"))
    console.print(f"wrote {out}" + (f" and {predictions}" if predictions else ""))


# ---------------------------------------------------------------------------- entry point
def _print_error(message: str) -> None:
    """One unwrapped line (paths stay copyable), the message escaped so '[...]' in it is not rich markup."""
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(message)}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except PalrError as e:
        _print_error(str(e))
        sys.exit(2)
    except KeyError as e:  # unknown registry names and the like
        _print_error(str(e.args[0] if e.args else e))
        sys.exit(2)


if __name__ == "__main__":
    main()
