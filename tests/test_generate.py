"""Generation through transformers' loop and KV cache: the FP default model's answer, and quantized layers whose
cached generation picks the tokens a full forward over the sequence picks."""

from __future__ import annotations

import pytest
import torch

from flatquant.generate import generate


def test_fp_default_model_names_the_capital(smollm2):
    model, tok = smollm2
    (text,) = generate(model, tok, ["The capital of Germany is"], max_new_tokens=3)
    assert text.startswith(" Berlin")


def _quantized(method: str, epochs: int = 0):
    from conftest import random_llama
    from flatquant.calibrate import CalibConfig, quantize_model
    from flatquant.methods import get_method
    from flatquant.spec import QuantConfig

    model = random_llama(hidden=128, inter=192, heads=4, kv_heads=2, layers=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, ids, get_method(method), QuantConfig(), CalibConfig(epochs=epochs, batch_size=2))
    return model


@pytest.mark.parametrize("method", ["flatquant", "quarot", "rtn"])
def test_cached_generation_equals_full_forward_greedy(method):
    """W4A4KV4 layers (K transform, K/V quantized per head) with transformers' DynamicCache: every generated token
    is the argmax of a full, uncached forward over the prompt and the tokens before it, and the cached step's
    logits equal the full forward's to float32 rounding (the cache holds exactly the quantized K/V the full
    forward computes: quantization is per token, so it does not depend on the tokens after)."""
    from flatquant.quant_layer import QuantLayer

    model = _quantized(method)
    assert all(isinstance(layer, QuantLayer) and layer.layer_idx == i for i, layer in enumerate(model.model.layers))
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        full = model(seq).logits
    new = seq[0, prompt.shape[1]:]
    assert torch.equal(full[0, prompt.shape[1] - 1 : -1].argmax(-1), new)
    for step, logits in enumerate(out.logits):
        ref = full[0, prompt.shape[1] - 1 + step]
        assert torch.allclose(logits[0], ref, rtol=1e-4, atol=1e-4), (step, float((logits[0] - ref).abs().max()))


def test_new_tokens_after_cached_ones_attend_causally():
    """Two new tokens after a cached prefix (chunked prefill): the same logits as one forward over all of them."""
    from transformers import DynamicCache

    model = _quantized("flatquant")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        tail = model(ids[:, 6:], past_key_values=cache, use_cache=True, position_ids=torch.arange(6, 9)[None]).logits
    assert torch.allclose(tail[0], full[0, 6:], rtol=1e-4, atol=1e-4)


def test_bad_requests_are_refused(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, ["x"], max_new_tokens=0)


def test_kernel_and_fake_quant_models_generate_the_same_tokens():
    """use_kernels() (the W4A4 Triton kernels; the interpreter on a CPU) against fake quantization, both through
    model.generate with the cache: the same greedy tokens for a fixed prompt."""
    import copy

    pytest.importorskip("triton")
    model = _quantized("flatquant")
    real = copy.deepcopy(model)
    for layer in real.model.layers:
        layer.use_kernels()
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kw), real.generate(prompt, **kw))
