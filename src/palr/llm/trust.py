"""Which LLM a run's files may name: a run is data someone may have copied, never configuration.

* An LLM the **user** names (``--llm``, or a config file they pass) is used as given; credentials
  (``$OPENAI_API_KEY``) go only there.
* An LLM a **run file** names (``ranking.json``'s ``llm``, a ``profiler`` of ``llm:SPEC``):
  - a remote endpoint (``openai:...``, any other backend that is not a local model) is refused unless the user
    confirms it (``--trust-run-llm``), and even then it gets no credentials;
  - a model directory must resolve inside the run (:func:`palr.runs.safety.inside_run`);
  - a Hugging Face hub id (e.g. a LoRA run's ``base_model``) is loaded from the local cache only, never
    downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palr.core.errors import RunError
from palr.llm.hf import looks_local
from palr.llm.registry import parse_spec
from palr.runs.safety import inside_run

__all__ = ["run_llm_spec", "run_model_spec"]


LOCAL_BACKENDS = ("hf", "mini")


def run_llm_spec(run: str | Path, spec: str, *, trust: bool = False, source: str = "ranking.json") -> tuple[str, dict[str, Any]]:
    """(spec, options) for :func:`palr.llm.registry.load_llm` of an LLM ``spec`` read from a run's ``source``.

    Local models must lie inside the run; a hub id is read from the local cache only; a remote endpoint needs
    ``trust`` and then gets no credentials (``api_key=""``)."""
    run = Path(run)
    backend, target = parse_spec(spec) if spec.strip() else ("", "")
    where = f"{run / source}"
    if backend == "mini":
        return f"mini:{inside_run(run, target, 'the mini model directory')}", {}
    if backend == "hf":
        if looks_local(target) or (run / target).exists():
            return f"hf:{inside_run(run, target, 'the model directory')}", {}
        return f"hf:{target}", {"offline": True}  # a hub id: the local cache only, never a download
    if not trust:
        shown = spec if len(spec) <= 120 else spec[:120] + "..."
        raise RunError(f"{where} names the LLM {shown!r}: palr sends no data or credentials to an endpoint a run "
                       "file names. Name it yourself with --llm SPEC (credentials such as OPENAI_API_KEY go only to "
                       "an endpoint you name), or confirm this one with --trust-run-llm (sent without credentials)")
    if backend == "openai":
        return spec, {"api_key": ""}  # confirmed, never given the user's key
    return spec, {}


def run_model_spec(run: str | Path, base_model: str, llm_dir: str, lora: bool) -> tuple[str, dict[str, Any]]:
    """(spec, options) of a fine-tuned run's own model (``base_model``/``llm_dir``/``lora`` of ranking.json):
    ``llm_dir`` inside the run; a LoRA base model that is a hub id from the local cache only (no download)."""
    run = Path(run)
    model_dir = inside_run(run, llm_dir or "", "llm_dir")
    if lora:
        if not base_model:
            raise RunError(f"{run / 'ranking.json'}: a LoRA run without base_model")
        opts: dict[str, Any] = {"adapter": model_dir, "chat": "off"}
        if not looks_local(base_model):
            opts["offline"] = True  # the run names it: read from the local Hugging Face cache, never downloaded
        return f"hf:{base_model}", opts
    if base_model == "mini":
        return f"mini:{model_dir}", {"chat": "off", "batch_size": 64}
    return f"hf:{model_dir}", {"chat": "off"}
