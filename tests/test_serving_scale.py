"""Inference at scale: a LoRA run exported as one model directory for a server (vLLM, `palr model serve`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")


def test_merged_lora_model_scores_like_base_plus_adapter(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch
    from conftest_llm import build_tiny_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from palr.llm.hf import HFLLM, merge_adapter

    base = build_tiny_model(tmp_path / "base")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    prompts = ["Input: User watched movies \"Heat (1995)\". Answer:", "hello world the a", "A: B: C: Answer:"]
    labels = [" A", " B", " C", " D"]
    with_adapter = HFLLM(base, adapter=tmp_path / "adapter", device="cpu", dtype="float32").score_choices(prompts, labels)
    standalone = HFLLM(merged, device="cpu", dtype="float32").score_choices(prompts, labels)
    plain = HFLLM(base, device="cpu", dtype="float32").score_choices(prompts, labels)
    np.testing.assert_allclose(standalone, with_adapter, atol=1e-4)
    assert not np.allclose(plain, with_adapter, atol=1e-3)  # the adapter matters, and the merge kept it
