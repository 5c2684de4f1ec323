"""The LLM layer: hf backend on a tiny random LLaMA, the mini model, and the openai backend on a loopback server."""

# ruff: noqa: F811 - pytest fixtures imported from conftest_llm are redefined as arguments
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_llm import tiny_catalog, tiny_dir, tiny_llm  # noqa: F401 - fixtures

from palr.core.errors import PalrError
from palr.llm.protocol import LLM, single_token_labels
from palr.llm.registry import load_llm, parse_spec

PROMPTS = ["Recommend 10 other movies. Answer:", "Heat", "Input: User watched movies \"Casino (1995)\". Answer:"]


def manual_logprob(llm, prompt: str, label: str) -> float:
    """Teacher-forced log p(label | prompt) from one unpadded forward pass over the whole sequence."""
    p = llm.tokenizer.encode(prompt, add_special_tokens=True)
    lab = llm.tokenizer.encode(label, add_special_tokens=False)
    ids = torch.tensor([p + lab])
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(p) - 1 + k, t] for k, t in enumerate(lab)))


def test_protocol_and_spec(tiny_llm, tiny_dir):
    assert isinstance(tiny_llm, LLM)
    assert parse_spec(str(tiny_dir)) == ("hf", str(tiny_dir))
    assert parse_spec("openai:m@http://h:1/v1") == ("openai", "m@http://h:1/v1")
    with pytest.raises(PalrError, match="unknown LLM"):
        parse_spec("nonsense-model-name")


def test_bad_paths(tmp_path: Path, tiny_dir):
    with pytest.raises(PalrError, match="does not exist"):
        load_llm(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(PalrError, match="not a Hugging Face model"):
        load_llm(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(PalrError, match="causal language model"):
        load_llm(str(tmp_path))
    with pytest.raises(PalrError, match="mini model"):
        load_llm(f"mini:{tiny_dir}")  # a HF model, but not built by build_mini


def test_single_token_scores_shape_and_batch_equals_single(tiny_llm):
    labels = single_token_labels(tiny_llm.tokenizer, 5)
    assert all(len(tiny_llm.tokenizer.encode(x, add_special_tokens=False)) == 1 for x in labels)
    batch = tiny_llm.score_choices(PROMPTS, labels)
    assert batch.shape == (3, 5) and np.all(batch < 0)
    single = np.concatenate([tiny_llm.score_choices([p], labels) for p in PROMPTS])
    np.testing.assert_allclose(batch, single, atol=1e-4)
    for b, p in enumerate(PROMPTS):
        assert batch[b, 0] == pytest.approx(manual_logprob(tiny_llm, p, labels[0]), abs=1e-4)


def test_multi_token_labels_match_teacher_forcing(tiny_llm):
    labels = [" Toy Story (1995)", " Heat", " Casino (1995)", " A"]
    lengths = [len(tiny_llm.tokenizer.encode(x, add_special_tokens=False)) for x in labels]
    assert max(lengths) > 1 and min(lengths) == 1
    got = tiny_llm.score_choices(PROMPTS, labels)
    assert got.shape == (3, 4)
    want = np.array([[manual_logprob(tiny_llm, p, x) for x in labels] for p in PROMPTS])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_single_token_labels_too_few(tiny_llm):
    with pytest.raises(PalrError, match="single-token labels"):
        single_token_labels(tiny_llm.tokenizer, 500)


def test_generate_greedy_deterministic_batch_equals_single(tiny_llm):
    batch = tiny_llm.generate(PROMPTS, max_new_tokens=6)
    assert batch == [tiny_llm.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batch == tiny_llm.generate(PROMPTS, max_new_tokens=6)
    first = batch[0]
    if len(first) > 2:
        stop = first[1:3]
        assert tiny_llm.generate(PROMPTS[:1], max_new_tokens=6, stop=[stop])[0] == first[:first.find(stop)]


def test_constrained_generation(tiny_llm):
    allowed = tiny_llm.tokenizer.encode(" Heat", add_special_tokens=False)
    seen: list[tuple[int, int]] = []

    def fn(prompt_index: int, generated: torch.Tensor) -> list[int]:
        seen.append((prompt_index, len(generated)))
        return [allowed[len(generated) % len(allowed)]]

    out = tiny_llm.generate(PROMPTS, max_new_tokens=len(allowed), prefix_allowed_tokens_fn=fn)
    assert out == [" Heat"] * 3
    assert {i for i, _ in seen} == {0, 1, 2} and min(n for _, n in seen) == 0


def test_mini_build_and_load(tmp_path: Path):
    from palr.llm.mini import (
        build_mini,
        item_token,
        item_token_ids,
        label_tokens,
        parse_item_tokens,
        read_mini_info,
    )

    cat = tiny_catalog()
    d = build_mini(cat, tmp_path / "mini", vocab_size=400, n_layer=1, n_embd=32, n_head=2, n_label_tokens=8)
    info = read_mini_info(d)
    assert info["n_items"] == len(cat) and info["parameters"] > 0
    llm = load_llm(f"mini:{d}")
    hf = load_llm(f"hf:{d}")
    tok = llm.tokenizer
    ids = item_token_ids(tok, len(cat))
    assert len(set(ids.tolist())) == len(cat)
    assert tok.encode(item_token(3), add_special_tokens=False) == [int(ids[3])]
    assert all(len(tok.encode(x, add_special_tokens=False)) == 1 for x in label_tokens(8))
    assert parse_item_tokens(tok.decode(tok.encode(f"{item_token(2)}{item_token(5)}", add_special_tokens=False))) \
        == [2, 5]
    prompt = "Toy Story (1995) Answer:"
    np.testing.assert_allclose(llm.score_choices([prompt], label_tokens(8)),
                               hf.score_choices([prompt], label_tokens(8)), atol=1e-6)
    again = build_mini(cat, tmp_path / "mini2", vocab_size=400, n_layer=1, n_embd=32, n_head=2, n_label_tokens=8)
    assert (again / "tokenizer.json").read_text() == (d / "tokenizer.json").read_text()
    np.testing.assert_array_equal(load_llm(f"mini:{again}").score_choices([prompt], label_tokens(8)),
                                  llm.score_choices([prompt], label_tokens(8)))


# ---------------------------------------------------------------------------- openai backend, real server
class ScriptedLLM:
    """A model without log-probabilities that always answers " B is best" (drives the parse fallback)."""

    name = "scripted"

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, stop=None, **kw):
        return [" B is best"] * len(prompts)

    def score_choices(self, prompts, labels):  # pragma: no cover - not served
        raise NotImplementedError


@pytest.fixture(scope="module")
def server_url(tiny_llm):
    from serving import BackgroundServer

    from palr.llm.server import create_app

    with BackgroundServer(create_app(tiny_llm, model_name="tiny")) as url:
        yield url


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_openai_backend_matches_hf(server_url, tiny_llm, api):
    client = load_llm(f"openai:tiny@{server_url}", api=api, top_logprobs=len(tiny_llm.tokenizer), timeout=30)
    prompts = PROMPTS if api == "completions" else PROMPTS[:1]
    assert client.generate(prompts, max_new_tokens=5) == tiny_llm.generate(prompts, max_new_tokens=5)
    labels = single_token_labels(tiny_llm.tokenizer, 4)
    got = client.score_choices(prompts, labels)
    assert client.last_scoring == ("echo" if api == "completions" else "top_logprobs")
    np.testing.assert_allclose(got, tiny_llm.score_choices(prompts, labels), atol=1e-3)


def test_openai_scores_the_label_tokens_of_many_multi_token_labels(server_url, tiny_llm):
    """50 labels, most of them several tokens in this tokenizer: the client asks for the label tokens' own
    log-probabilities (echo), so every label is scored exactly as the local model scores it."""
    from palr.llm.protocol import candidate_labels

    labels = [" " + x for x in candidate_labels()[:50]]
    assert sum(len(tiny_llm.tokenizer.encode(x, add_special_tokens=False)) > 1 for x in labels) > 10
    client = load_llm(f"openai:tiny@{server_url}", timeout=30)
    got = client.score_choices(PROMPTS[:2], labels)
    assert client.last_scoring == "echo" and np.isfinite(got).all()
    np.testing.assert_allclose(got, tiny_llm.score_choices(PROMPTS[:2], labels), atol=1e-3)
    # token-style labels (the embedded model's <iN> tokens) go through the same path
    assert client.failures == 0


def test_openai_parse_fallback():
    from serving import BackgroundServer

    from palr.llm.server import create_app

    with BackgroundServer(create_app(ScriptedLLM())) as url:
        client = load_llm(f"openai:palr@{url}")
        got = client.score_choices(["x", "y"], [" A", " B", " C"])
    assert client.last_scoring == "parsed"
    assert got[:, 1].tolist() == [0.0, 0.0] and np.isneginf(got[:, [0, 2]]).all()


def test_openai_timeout_and_malformed(tiny_llm):
    from serving import BackgroundServer

    from palr.llm.server import create_app

    with BackgroundServer(create_app(tiny_llm, delay_s=1.0)) as url:
        client = load_llm(f"openai:palr@{url}", timeout=0.2, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(PalrError, match="timed out"):
            client.generate(["hello"])
        assert time.monotonic() - start < 3
    for api in ("completions", "chat"):
        with BackgroundServer(create_app(tiny_llm, fault="malformed")) as url:
            client = load_llm(f"openai:palr@{url}", api=api, max_retries=2, backoff=0.01)
            with pytest.raises(PalrError, match="malformed answer.*after 3 attempts|after 3 attempts.*malformed"):
                client.generate(["hello"])
    from palr.core.errors import LLMUnavailable

    dead = load_llm("openai:m@http://127.0.0.1:9/v1", max_retries=2, backoff=0.01, timeout=1)
    with pytest.raises(LLMUnavailable, match="connection failed"):
        dead.generate(["x"])
    assert dead.failures == 1 and dead.consecutive_unreachable == 1
    start = time.monotonic()
    with pytest.raises(LLMUnavailable, match=r"\(1 attempts\)"):  # a dead server is not retried again and again
        dead.score_choices(["x"], [" A"])
    assert time.monotonic() - start < 2 and dead.failures == 2
