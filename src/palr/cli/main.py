"""The `palr` command line: each command's flags come from its dataclass in :mod:`palr.core.settings`.

A command body gets the built config and makes one library call. Errors (PalrError, bad flags, bad config
values) are one line on stderr and exit code 2; a traceback only with ``--debug`` or ``PALR_DEBUG=1``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from palr import __version__
from palr.cli.flags import typer_command
from palr.core import settings as C
from palr.core.errors import PalrError
from palr.core.options import parse_params
from palr.runs.safety import check_outputs

__all__ = ["app", "main", "parse_params"]


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PALR: profile, retrieve and rank with LLMs, evaluated honestly.")


data_app = typer.Typer(no_args_is_help=True, help="Data sets: download, statistics.")


model_app = typer.Typer(no_args_is_help=True, help="LLMs: create the embedded mini model, import Gemma, serve.")


app.add_typer(data_app, name="data")


app.add_typer(model_app, name="model")


console = Console(highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"palr {__version__}")
        raise typer.Exit()


@app.callback()
def _global(verbose: bool = typer.Option(False, "--verbose", "-v", help="INFO log lines on the console too."),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no progress bars, no notes."),
            debug: bool = typer.Option(False, "--debug", help="Tracebacks for errors (also PALR_DEBUG=1)."),
            version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                         help="Print the version and exit.")) -> None:
    from palr.core.console import setup

    setup(verbose=verbose, quiet=quiet, debug=debug)


# ---------------------------------------------------------------------------- data
def data_stats(cfg: C.DataStatsConfig) -> None:
    from palr.data import load_dataset

    stats = load_dataset(cfg.data).stats()
    if cfg.json:
        print(json.dumps(stats, indent=2))
        return
    console.print(f"[bold]{escape(stats['dataset'])}[/bold]: {stats['users']:,} users, {stats['items']:,} items, "
                  f"{stats['interactions']:,} interactions (density {stats['density']:.4%}); "
                  f"sequence length min {stats['sequence_length']['min']} / mean {stats['sequence_length']['mean']} "
                  f"/ max {stats['sequence_length']['max']}")


def data_download(cfg: C.DataDownloadConfig) -> None:
    from palr.data import data_dir as resolve
    from palr.data.download import download

    sums = download(cfg.name, resolve(cfg.data_dir), cfg.timeout)
    for fname, digest in sums.items():
        print(f"{fname}  sha256 {digest}")


# ---------------------------------------------------------------------------- retrieval
def train(cfg: C.TrainConfig) -> None:
    from palr.train.retriever import train_run

    check_outputs({"--out": cfg.out}, directories=["--out"])
    run = train_run(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    console.print(f"saved run {escape(str(run))}; valid NDCG@10 {metrics['valid']['NDCG@10']:.4f} "
                  f"HR@10 {metrics['valid']['HR@10']:.4f}")


def tune(cfg: C.TuneConfig) -> None:
    from palr.core.errors import PalrError
    from palr.data import load_split
    from palr.train.tune import load_space_file
    from palr.train.tune import tune as run_tune

    check_outputs({"--out": cfg.out}, directories=["--out"])
    res = run_tune(cfg.data.dataset, cfg.retriever, cfg.out, budget_s=cfg.budget, trials=cfg.trials, seed=cfg.seed,
                   pruner=cfg.pruner, space=load_space_file(cfg.space, cfg.retriever) if cfg.space else None,
                   fixed=cfg.params, data_dir=cfg.data.data_dir, split=load_split(cfg.data), data=cfg.data.resolved())
    states = [t["state"] for t in res.trials]
    console.print(escape(f"{len(states)} trials ({states.count('complete')} complete, {states.count('pruned')} "
                         f"pruned); trial table {res.out / 'trials.csv'}"))
    if res.best_run is None:
        raise PalrError("no trial completed within the budget; raise --budget")
    console.print(escape(f"best valid NDCG@10 {res.best_value:.4f} with {json.dumps(res.best_params, sort_keys=True)}; "
                         f"run {res.best_run} (test it: palr evaluate {res.best_run} --out results.json)"))


def evaluate(cfg: C.EvaluateConfig) -> None:
    """Full-ranking leave-one-out evaluation on valid and test; writes results.json and predictions; every model
    is compared with the baseline on the same users (paired-bootstrap 95% CIs, p-value).

    With --llm, --candidates N is the number of retriever candidates the LLM ranks (default 20).
    Under `torchrun`/`accelerate launch` the users are split across the processes and gathered (same figures)."""
    from palr.core import distributed
    from palr.evaluate.retrievers import results_table
    from palr.evaluate.tables import comparisons_table, seeds_table

    out, predictions = cfg.out, cfg.predictions
    cands_path = cfg.candidates_out or (out.with_name("candidates.jsonl") if cfg.candidates else None)
    check_outputs({"--out": out, "--predictions": predictions, "--retriever-predictions": cfg.retriever_predictions,
                   "--per-user": cfg.per_user, "--candidates-out": cands_path,
                   "--llm-predictions": getattr(cfg, "llm_predictions", None)}, [cfg.run])
    distributed.init()
    if cfg.run is not None:
        from palr.runs.safety import read_json
        from palr.runs.snapshot import check_raw_data
        from palr.runs.store import read_run

        read_run(cfg.run)
        if cfg.data.dataset:  # raw data given again: checked against the run's snapshot, not used
            check_raw_data(cfg.run, cfg.data)
        kind = read_json(cfg.run / "run.json").get("kind")
        if kind == "palr" or cfg.llm:
            from palr.evaluate.palr import evaluate_palr_run

            doc = evaluate_palr_run(cfg.run, out=out, predictions=predictions,
                                    retriever_predictions=cfg.retriever_predictions, data_dir=cfg.data.data_dir,
                                    per_user=cfg.per_user, llm=cfg.llm, allow_fallback=cfg.allow_fallback,
                                    llm_predictions=cfg.llm_predictions,
                                    trust_run_llm=cfg.trust_run_llm,
                                    n_users=cfg.users, seed=cfg.seed,
                                    n_candidates=(cfg.candidates or None) if cfg.llm else None,
                                    latency_users=20 if cfg.llm else 100)
            if doc is None:  # a worker process of a sharded evaluation: the main process reports
                return
            counts = doc["llm"]
            console.print(f"PALR ranked by: {doc['protocol']['ranked_by']}", highlight=False, markup=False)
            if counts["name"]:
                console.print(f"LLM {counts['name']}: {doc['llm_failures']} of {doc['protocol']['test_users']} test users "
                              f"fell back; {counts['request_failures']} failed requests; "
                              f"profiles: {counts['profiler']} ({counts['profile_fallbacks']} fallbacks)",
                              highlight=False, markup=False)
            cr = {k: v for k, v in doc.get("candidate_recall", {}).items() if k != "sources"}
            if len(cr) > 1:
                console.print("candidate recall (test): " + ", ".join(f"{k} {v:.4f}" for k, v in cr.items()),
                              highlight=False, markup=False)
        else:
            from palr.retrieval.load import load_run
            from palr.train.retriever import evaluate_models

            if cfg.llm_predictions is not None:
                raise PalrError(f"{cfg.run} is a retriever run: --llm-predictions needs --llm SPEC (or a PALR run)")

            rcfg, model, split = load_run(cfg.run, cfg.data.data_dir)
            doc = evaluate_models({rcfg["config"]["retriever"]: model}, split, out, predictions, cfg.candidates,
                                  cands_path, seed=cfg.seed, per_user=cfg.per_user)
    else:
        from palr.data import load_split
        from palr.retrieval.base import param_types
        from palr.train.retriever import evaluate_models, evaluate_seeds, fit_retriever

        split = load_split(cfg.data)
        params = {name: {k: v for k, v in cfg.params.items() if k in param_types(name)} for name in cfg.retriever}
        if cfg.seeds is not None:
            doc = evaluate_seeds(cfg.retriever, split, cfg.seeds, out, predictions, cfg.per_user, cfg.baseline,
                                 cfg.candidates, params=params)
            if doc is None:
                return
            console.print(seeds_table(doc["seed_summary"], "test"))
            console.print(escape(f"wrote {out}" + (" and one predictions file per seed" if predictions else "")))
            return
        models, timings = {}, {}
        for name in cfg.retriever:
            models[name], fit_s = fit_retriever(name, split, params[name], seed=cfg.seed, progress=True)
            timings[f"{name}.fit_s"] = round(fit_s, 3)
        doc = evaluate_models(models, split, out, predictions, cfg.candidates, cands_path, timings=timings,
                              seed=cfg.seed, per_user=cfg.per_user, baseline=cfg.baseline)
    if doc is None:  # not the main process: its users were gathered there
        return
    console.print(results_table(doc["results"], "test", labels=doc.get("ranked_by")))
    if doc.get("comparisons"):
        console.print(comparisons_table(doc["comparisons"], "test"))
    written = [str(p) for p in (predictions, cfg.llm_predictions) if p]
    console.print(escape(f"wrote {out}" + "".join(f" and {p}" for p in written)))


def compare(cfg: C.CompareConfig) -> None:
    from palr.core.io import write_json
    from palr.core.metrics import DEFAULT_KS
    from palr.evaluate.tables import compare_sides, compare_table, load_side

    ks = tuple(cfg.k or DEFAULT_KS)
    check_outputs({"--out": cfg.out}, [cfg.a, cfg.b, cfg.run])
    split = None
    if cfg.run is not None:  # the run's data snapshot; raw data given too is checked against it
        from palr.runs.snapshot import load_run_split

        split = load_run_split(cfg.run, data=cfg.data if cfg.data.dataset else None)
    elif cfg.data.dataset:
        from palr.data import load_split

        split = load_split(cfg.data)
    doc = compare_sides(load_side(cfg.a, split, cfg.stage, cfg.a_model, ks),  # type: ignore[arg-type]
                        load_side(cfg.b, split, cfg.stage, cfg.b_model, ks), n_boot=cfg.n_boot, seed=cfg.seed)
    if cfg.out is not None:
        write_json(cfg.out, doc)
    if cfg.json:
        print(json.dumps(doc, indent=2))
        return
    console.print(compare_table(doc))
    if doc["only_in_model"] or doc["only_in_baseline"]:
        console.print(f"[yellow]note:[/yellow] compared on the {doc['users']} users in both files "
                      f"({doc['only_in_model']} only in A, {doc['only_in_baseline']} only in B)")


def report(cfg: C.ReportConfig) -> None:
    from palr.evaluate.report import write_report

    runs = [d for r in cfg.runs if r.is_dir() for d in (r, *r.iterdir()) if (d / "run.json").exists()]
    check_outputs({"--out": cfg.out}, runs)  # a demo folder's runs included
    path = write_report(list(cfg.runs), cfg.out, data_dir=cfg.data_dir, n_examples=cfg.examples, seed=cfg.seed)
    console.print(escape(f"wrote {path.resolve()}"))


# ---------------------------------------------------------------------------- LLM layer
def profile(cfg: C.ProfileConfig) -> None:
    from palr.data import load_dataset
    from palr.rank.profiles import profile_dataset

    check_outputs({"--out": cfg.out})
    profiles = profile_dataset(load_dataset(cfg.data), None if cfg.all else [cfg.user or ""], llm=cfg.llm,
                               cache=cfg.cache, stage=cfg.stage, progress=cfg.all, allow_fallback=cfg.allow_fallback)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in profiles))
        console.print(escape(f"wrote {len(profiles)} profiles to {cfg.out}"))
    elif cfg.json:
        docs = [p.to_dict() for p in profiles]
        print(json.dumps(docs[0] if cfg.user is not None else docs, indent=2))
    else:
        for p in profiles:
            note = f"  ({p.note})" if p.note else ""
            console.print(f"[bold]{escape(p.user)}[/bold] \\[{p.source}] {escape(p.profile)}{escape(note)}")


def model_create_mini(cfg: C.CreateMiniConfig) -> None:
    from palr.data import load_dataset
    from palr.llm.mini import build_mini, read_mini_info

    m = cfg.mini
    check_outputs({"--out": cfg.out}, directories=["--out"])
    path = build_mini(load_dataset(cfg.data).catalog, cfg.out, vocab_size=m.vocab, item_tokens=cfg.item_tokens,
                      n_label_tokens=cfg.label_tokens, n_layer=m.layers, n_embd=m.dim, n_head=m.heads, seed=cfg.seed)
    info = read_mini_info(path)
    console.print(escape(f"mini model: {info['parameters'] / 1e6:.2f}M parameters, vocabulary {info['vocab_size']} "
                         f"-> {path} (load with --llm mini:{path})"))


def model_import(cfg: C.ModelImportConfig) -> None:
    from palr.llm.gemma import import_model

    check_outputs({"--out": cfg.out}, directories=["--out"])
    path = import_model(cfg.name, cfg.out)
    console.print(escape(f"wrote {path} (load with --llm hf:{path})"))


def model_export(cfg: C.ModelExportConfig) -> None:
    from palr.train.finetune import export_model

    check_outputs({"--out": cfg.out}, [cfg.run], directories=["--out"])
    path = export_model(cfg.run, cfg.out)
    console.print(escape(f"wrote {path} (serve it: vllm serve {cfg.out}, or palr model serve {cfg.out})"))


def model_serve(cfg: C.ModelServeConfig) -> None:
    from palr.llm.server import main as serve

    serve([cfg.spec, "--host", cfg.host, "--port", str(cfg.port), "--name", cfg.name])


# ---------------------------------------------------------------------------- PALR
def finetune(cfg: C.FinetuneCommand) -> None:
    from palr.core import distributed
    from palr.train.finetune import finetune as run_finetune

    check_outputs({"--out": cfg.out}, [cfg.run], directories=["--out"])
    if cfg.ranker == "features":
        from palr.rank.trees import FeatureRankerConfig
        from palr.train.trees import train_feature_run

        t = cfg.train
        fcfg = FeatureRankerConfig(n_candidates=t.examples.n_candidates, seed=t.seed, holdout=t.holdout,
                                   text_encoder=t.text_encoder)
        path = train_feature_run(cfg.run, cfg.out, fcfg, data_dir=cfg.data_dir, sources=t.sources)
        m = json.loads((path / "metrics.json").read_text())["valid"]
        if "holdout_ndcg@10_without_llm" in m:  # merged candidates: the trees with every source's features
            console.print(escape(f"saved feature-ranker run {path} in {m['total_seconds']:.0f} s; held-out validation "
                                 f"NDCG@10 {m['holdout_ndcg@10_without_llm']:.4f} (retriever "
                                 f"{m['holdout_ndcg@10_retriever']:.4f}, {m['rounds_without_llm']} rounds); candidate "
                                 f"recall (valid): {m['candidate_recall']}"))
            return
        console.print(escape(f"saved feature-ranker run {path} in {m['total_seconds']:.0f} s; held-out validation "
                             f"NDCG@10 {m['holdout_ndcg@10']:.4f} (retriever {m['holdout_ndcg@10_retriever']:.4f}, "
                             f"{m['rounds']} rounds, text: {m['text_encoder']})"))
        return

    path = run_finetune(cfg.run, cfg.out, cfg.train, data_dir=cfg.data_dir, overwrite=cfg.overwrite,
                        progress=distributed.is_main())
    if not distributed.is_main():
        return
    m = json.loads((path / "metrics.json").read_text())["valid"]
    console.print(f"saved PALR run {escape(str(path))}; held-out valid NDCG@10 {m['ndcg@10']:.4f} (LLM alone "
                  f"{m['ndcg@10_llm']:.4f}, retriever {m['ndcg@10_retriever']:.4f}, fusion weight {m['weight']})")
    if "features" in m:
        f = m["features"]
        console.print(f"    with the feature ranker: {f['ndcg@10']:.4f} (feature ranker alone "
                      f"{f['ndcg@10_features']:.4f}, LLM weight {f['weight']})")


def recommend(cfg: C.RecommendConfig) -> None:
    from palr.data.titles import split_titles
    from palr.rank.pipeline import PALR

    titles = split_titles(cfg.history_titles) if cfg.history_titles is not None else None
    palr = PALR.load(cfg.run, cfg.data_dir, mode=cfg.mode, llm=cfg.llm, allow_fallback=cfg.allow_fallback,
                     trust_run_llm=cfg.trust_run_llm)
    rec = palr.recommend(user=cfg.user, history=cfg.history, k=cfg.k, explain=cfg.explain, history_titles=titles,
                         llm_explanations=cfg.llm_explanations)
    if cfg.json:
        print(json.dumps(rec.to_dict(), indent=2, ensure_ascii=False))
        return
    print_recommendation(rec)


def print_recommendation(rec: object) -> None:
    """Titles are catalogue data: always printed quoted and cleaned, never as markup."""
    from palr.llm.prompts import clean_text

    for m in rec.matches:  # type: ignore[attr-defined]
        got = f'"{clean_text(m["title"])}" ({m["item"]}, score {m["score"]:.0f})' if m["item"] else "no match"
        console.print(f"[dim]title[/dim] {escape(repr(m['query']))} -> {escape(got)}")
    for n in rec.notes:  # type: ignore[attr-defined]
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    llm = rec.llm  # type: ignore[attr-defined]
    ranker = f"ranker: {llm['ranker']}; " if llm.get("ranker") and llm.get("ranker") != llm.get("ranked_by") else ""
    console.print(f"[bold]ranked by:[/bold] {escape(str(llm.get('ranked_by')))} ({escape(ranker)}"
                  f"LLM {escape(str(llm.get('name') or 'none'))}; "
                  f"LLM failures so far: {llm.get('ranking_fallback_users', 0)})")
    console.print(f"[bold]profile:[/bold] {escape(rec.profile)}")  # type: ignore[attr-defined]
    for i, it in enumerate(rec.items, 1):  # type: ignore[attr-defined]
        how = (f"popularity {it['popularity']}" if it.get("score") is None else f"score {it['score']:.3f}")
        console.print(f'{i:>2}. "{escape(clean_text(it["title"]))}" [dim]({escape(it["item"])}, {how})[/dim]',
                      soft_wrap=True)
        if it.get("explanation"):
            console.print(f"    {escape(it['explanation'])}", soft_wrap=True)


def demo(cfg: C.DemoConfig) -> None:
    from palr.cli.demo import run_demo

    check_outputs({"--out": cfg.out}, directories=["--out"])
    run_demo(cfg.dataset, cfg.out, quick=cfg.quick, data_dir=cfg.data_dir, seed=cfg.seed, console=console,
             overwrite=cfg.overwrite)


def serve(cfg: C.ServeConfig) -> None:
    from palr.serve.app import serve as run_service

    run_service(cfg.run, cfg.service, data_dir=cfg.data_dir, llm=cfg.llm, allow_fallback=cfg.allow_fallback,
                trust_run_llm=cfg.trust_run_llm)


COMMANDS: list[tuple[Any, str, type, Any]] = [
    (data_app, "stats", C.DataStatsConfig, data_stats),
    (data_app, "download", C.DataDownloadConfig, data_download),
    (app, "train", C.TrainConfig, train),
    (app, "tune", C.TuneConfig, tune),
    (app, "evaluate", C.EvaluateConfig, evaluate),
    (app, "profile", C.ProfileConfig, profile),
    (model_app, "create-mini", C.CreateMiniConfig, model_create_mini),
    (model_app, "import", C.ModelImportConfig, model_import),
    (model_app, "export", C.ModelExportConfig, model_export),
    (model_app, "serve", C.ModelServeConfig, model_serve),
    (app, "finetune", C.FinetuneCommand, finetune),
    (app, "recommend", C.RecommendConfig, recommend),
    (app, "demo", C.DemoConfig, demo),
    (app, "serve", C.ServeConfig, serve),
    (app, "report", C.ReportConfig, report),
    (app, "compare", C.CompareConfig, compare),
]


for _parent, _name, _cls, _body in COMMANDS:
    typer_command(_parent, _name, _cls, _body, help=_cls.__doc__)


_DAMAGED_FILE_ERRORS = ("JSONDecodeError", "SafetensorError", "DatabaseError", "BadZipFile", "UnicodeDecodeError",
                        "HeaderTooLarge")


def _print_error(message: str) -> None:
    """One line, printed literally (no markup: 'u.item:100:' stays as it is)."""
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()


def _exit_error(code: int, real_process: bool) -> None:
    """Exit with ``code`` after an error line. In a real ``palr`` process (no ``argv`` given) the interpreter's
    teardown is skipped once the streams are flushed: native thread pools (pyarrow's, seen) torn down right after
    an early error could abort the process (``terminate called...``, exit 134) after the one-line message."""
    if real_process:
        import logging
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from palr.core.console import debug_enabled

    real = argv is None
    try:
        code = app(args=argv, standalone_mode=False)
    except (PalrError, KeyError, typer.TyperException) as e:  # TyperException: bad flags (click's usage errors)
        if debug_enabled():
            raise
        if isinstance(e, typer.TyperException):
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            ctx = getattr(e, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _print_error(msg + hint)
            _exit_error(getattr(e, "exit_code", 2) or 2, real)
        _print_error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
        _exit_error(2, real)
    except typer.Abort:
        _print_error("aborted")
        sys.exit(1)
    except Exception as e:  # a damaged file that no loader named (JSON, safetensors, sqlite, zip): still one line
        if debug_enabled() or type(e).__name__ not in _DAMAGED_FILE_ERRORS:
            raise
        _print_error(f"a damaged file: {type(e).__name__}: {str(e)[:300]} (rerun with --debug for where)")
        _exit_error(2, real)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
