"""Shared fixtures: a tiny random LLaMA checkpoint on disk, and the real embedded default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # before any test module can import triton: its kernels then run in the CPU interpreter in-process
    os.environ.setdefault("TRITON_INTERPRET", "1")


def shared_token_cache(tmp: Path) -> Path:
    """The session's token cache, in pytest's base folder beside ``tmp`` (a tmp_path or mktemp folder): the session's
    runs tokenize WikiText-2 once instead of once a run (the cache is keyed by the tokenizer and the text)."""
    return tmp.parent / "tokens"


@pytest.fixture(scope="session")
def smollm2_gguf_cache(tmp_path_factory):
    """The gguf_cache folder that the smollm2 fixture's load converted into (one GGUF conversion per session)."""
    return tmp_path_factory.mktemp("gguf_cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_cache):
    """(model, tokenizer) of the embedded default (SmolLM2-135M, real pretrained weights), float32 CPU: converted
    from the GGUF, and the conversion kept in smollm2_gguf_cache."""
    from flatquant.model import load_model

    return load_model("embedded:smollm2", gguf_cache=smollm2_gguf_cache)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2):
    """A 2-layer random LlamaForCausalLM with the default model's tokenizer, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=smollm2[1].vocab_size if hasattr(smollm2[1], "vocab_size") else 49152,
                      hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    cfg.vocab_size = len(smollm2[1])
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    smollm2[1].save_pretrained(path)
    return path


def random_llama(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=256, seed=0):
    """A tiny random LlamaForCausalLM (float32, eval mode) with non-trivial norm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.config.use_cache = False
    return model
