"""Fixtures for the LLM-layer tests: a tiny random LLaMA and a tokenizer trained here (no downloads).

Imported explicitly by test_llm.py / test_profiles.py (the lead owns tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from palr.data.dataset import Catalog

TEXTS = [
    "Recommend 10 other movies based on user's watching history.",
    "Input: User watched movies \"Toy Story (1995)\", \"Heat (1995)\", \"Casino (1995)\".",
    "The candidates are \"Jumanji (1995)\", \"Sabrina (1995)\". Output: \"Heat (1995)\"",
    "Summarize the user's preferences in at most 5 short keywords. Keywords: drama movies, comedy movies",
    "A: B: C: D: E: Answer: A B C D E 1 2 3 4 5 hello world the a an of to and",
] * 4


def build_tiny_model(out: Path, *, bos: bool = True, seed: int = 0) -> Path:
    """A 2-layer, width-32 LlamaForCausalLM and a byte-level BPE tokenizer (vocab ~300), saved in HF format."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so tokens differ clearly in probability
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def tiny_catalog() -> Catalog:
    titles = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Jumanji (1995)", "Sabrina (1995)",
              "Alien (1979)", "Rocky (1976)", "Fargo (1996)"]
    genres = [["Animation", "Comedy"], ["Action", "Crime"], ["Crime", "Drama"], ["Adventure"],
              ["Comedy", "Romance"], ["Horror", "Sci-Fi"], ["Drama"], ["Crime", "Drama", "Thriller"]]
    attrs = [{"genres": g, "year": int(t[-5:-1])} for g, t in zip(genres, titles)]
    return Catalog(item_ids=[str(k + 1) for k in range(len(titles))], titles=titles, attributes=attrs,
                   kind="movies")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir: Path):
    from palr.llm.registry import load_llm

    return load_llm(f"hf:{tiny_dir}", dtype="float32", device="cpu", batch_size=3)
