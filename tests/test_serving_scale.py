"""Inference at scale: a LoRA run exported as one model directory for a server (vLLM, `palr model serve`), and the
OpenAI-compatible backend's bounded pool of requests and batches against palr's own server."""

# ruff: noqa: F811 - pytest fixtures imported from conftest_llm are redefined as arguments
from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
from conftest_llm import tiny_catalog, tiny_dir, tiny_llm  # noqa: F401 - fixtures


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


def counting_server(llm, hold_until: int):
    """palr's OpenAI-compatible server with a middleware that counts requests and the most in flight at once.

    While ``seen["gate"]`` is set, each request is held until that many are in flight (then the gate opens
    for all): the test sees the client's overlap by construction, not by a server delay that may or may not
    make requests overlap. A client that never reaches the gate is let through after 30 s (and fails)."""
    import asyncio
    import time

    from palr.llm.server import create_app

    app = create_app(llm, model_name="tiny")
    seen = {"now": 0, "max": 0, "requests": 0, "gate": hold_until}

    @app.middleware("http")
    async def count(request, call_next):  # the event loop runs one at a time: no lock needed
        if request.url.path == "/health":  # the test server's readiness probe is not the client's
            return await call_next(request)
        seen["now"] += 1
        seen["requests"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        try:
            deadline = time.monotonic() + 30
            while seen["gate"] and seen["now"] < seen["gate"] and time.monotonic() < deadline:
                await asyncio.sleep(0.002)  # polls the condition; the others arrive meanwhile
            seen["gate"] = 0
            return await call_next(request)
        finally:
            seen["now"] -= 1

    return app, seen


def test_served_model_ranks_like_the_local_one_with_a_bounded_pool_and_batches(tiny_llm) -> None:
    pytest.importorskip("fastapi")
    from serving import BackgroundServer

    from palr.llm.protocol import single_token_labels
    from palr.llm.registry import load_llm
    from palr.rank.llm_ranker import PromptBuilder, Ranker

    catalog = tiny_catalog()
    rng = np.random.default_rng(0)
    users = 12
    hist, cands = [], []
    for _ in range(users):
        order = rng.permutation(len(catalog))
        hist.append(order[:3])
        cands.append(order[3:7])
    cands_arr = np.array(cands)
    builder = PromptBuilder(catalog, "text", history_len=5)
    labels = single_token_labels(tiny_llm.tokenizer, 4)  # the same prompts on both sides

    def ranker(llm) -> Ranker:
        r = Ranker(llm, builder, batch_size=32)
        r.text_labels = lambda n: labels[:n]  # type: ignore[method-assign]
        return r

    local = ranker(tiny_llm).rank(hist, [None] * users, cands_arr)
    app, seen = counting_server(tiny_llm, hold_until=3)
    with BackgroundServer(app) as url:
        client = load_llm(f"openai:tiny@{url}", concurrency=3, batch_size=4, timeout=30)
        served = ranker(client).rank(hist, [None] * users, cands_arr)
        assert not served.failed.any() and client.last_scoring == "echo"  # the label tokens' own log-probs
        np.testing.assert_array_equal(served.order, local.order)  # the same rankings as the local backend
        np.testing.assert_allclose(served.scores, local.scores, atol=1e-3)
        assert seen["requests"] == users and seen["max"] == 3  # `concurrency` at once, never more

        # generation: four prompts a request (the server takes lists), the same texts as the local model
        seen.update(max=0, requests=0)
        prompts = [f"Input: User watched movies {catalog.titles[k]}. Answer:" for k in range(8)] + ["hello", "A:"]
        assert client.generate(prompts, max_new_tokens=4) == tiny_llm.generate(prompts, max_new_tokens=4)
        assert seen["requests"] == math.ceil(len(prompts) / 4)

        # many threads sharing one client: still at most `concurrency` requests in flight
        seen.update(max=0, requests=0, gate=3)
        client.batch_size = 1
        outs: list[list[str]] = []
        threads = [threading.Thread(target=lambda: outs.append(client.generate(["hello world"] * 3, max_new_tokens=2)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(outs) == 4 and seen["requests"] == 12
        assert seen["max"] == 3


def test_openai_client_settings_in_the_spec() -> None:
    from palr.core.errors import PalrError
    from palr.llm.registry import load_llm

    client = load_llm("openai:m@http://127.0.0.1:9/v1?concurrency=16&batch_size=32&timeout=5")
    assert (client.concurrency, client.batch_size, client.timeout) == (16, 32, 5.0)
    assert client.base_url == "http://127.0.0.1:9/v1"  # the settings are not part of the URL
    with pytest.raises(PalrError, match="unknown openai client setting"):
        load_llm("openai:m@http://127.0.0.1:9/v1?workers=2")
    with pytest.raises(PalrError, match="not a valid int"):
        load_llm("openai:m@http://127.0.0.1:9/v1?concurrency=many")
