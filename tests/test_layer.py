"""QuantDecoderLayer: equal to the transformers layer at 16 bits, and merging changes nothing."""

import copy

import pytest
import torch

from conftest import random_llama
from flatquant.adapters import adapter_for
from flatquant.calibrate import layer_inputs, quantize_model, CalibConfig
from flatquant.data import eval_windows, load_tokens
from flatquant.evaluate import perplexity
from flatquant.layer import QuantDecoderLayer
from flatquant.methods import get_method
from flatquant.spec import QuantConfig

FP = QuantConfig(w_bits=16, a_bits=16, k_bits=16, v_bits=16, lwc=False, lac=False)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _layer_and_inputs(model, seq=12, batch=3):
    adapter = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    inps, pe = layer_inputs(model, ids, "cpu")
    layer = adapter.layers(model)[0]
    return layer, adapter.parts(layer, model.config), inps, pe


def _random_flatquant_transforms(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(parts.linears[n].weight.shape[1], generator=g) + 0.5 for k, n in (("qkv", "q"), ("upgate", "up"), ("down", "down"))}
    t = get_method("flatquant").transforms(parts, stats, g)
    with torch.no_grad():
        for tr in t.values():
            for p in tr.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if tr.diag is not None:
                tr.diag.abs_().add_(0.2)
    return t


def test_identity_16bit_layer_equals_transformers_layer():
    model = random_llama()
    layer, parts, inps, pe = _layer_and_inputs(model)
    with torch.no_grad():
        ref = layer(inps, position_embeddings=pe)
        out = QuantDecoderLayer(parts, FP, {})(inps, position_embeddings=pe)
    assert rel(out, ref) < 1e-6


def test_merged_equals_unmerged_and_fp_at_16_bits():
    """Transforms far from the identity, 16-bit quantizers: unmerged = merged = FP layer (fp32, rel < 1e-4)."""
    model = random_llama()
    layer, parts, inps, pe = _layer_and_inputs(model)
    q = QuantDecoderLayer(parts, FP, _random_flatquant_transforms(parts))
    with torch.no_grad():
        ref = layer(inps, position_embeddings=pe)
        unmerged = q(inps, position_embeddings=pe)
        q.merge()
        merged = q(inps, position_embeddings=pe)
    assert rel(unmerged, ref) < 1e-4
    assert rel(merged, unmerged) < 1e-4


def test_merged_equals_unmerged_at_4_bits():
    """With real quantizers the merged layer computes the same function up to rare rounding-boundary flips."""
    model = random_llama()
    layer, parts, inps, pe = _layer_and_inputs(model)
    q = QuantDecoderLayer(parts, QuantConfig(), _random_flatquant_transforms(parts))
    with torch.no_grad():
        unmerged = q(inps, position_embeddings=pe)
        q.merge()
        merged = q(inps, position_embeddings=pe)
        ref = layer(inps, position_embeddings=pe)
    assert rel(merged, unmerged) < 0.1 * rel(unmerged, ref)


def test_16bit_identity_model_perplexity_equals_fp(smollm2):
    """The real default model, all layers swapped for 16-bit identity QuantDecoderLayers: same perplexity."""
    model, tok = smollm2
    windows = eval_windows(load_tokens(tok, "wikitext2", "test", cache_dir=None)[:1024], 256, max_windows=2)
    fp = perplexity(model, windows)
    quant = copy.deepcopy(model)
    quantize_model(quant, torch.zeros(0, 0, dtype=torch.long), get_method("rtn"), FP, CalibConfig())
    assert isinstance(adapter_for(quant).layers(quant)[0], QuantDecoderLayer)
    assert abs(perplexity(quant, windows) / fp - 1) < 1e-5
    assert 5 < fp < 200


def _calibrated_tiny(wquant="rtn", seed=0):
    """A 2-layer random LLaMA calibrated by FlatQuant (one epoch) at W4A4KV4, merged."""
    model = random_llama(seed=seed)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))
    quantize_model(model, ids, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=1, batch_size=2, wquant=wquant), pack=False)
    return model


@pytest.mark.parametrize("wquant", ["rtn", "gptq"])
def test_packed_weights_give_identical_outputs_in_an_eighth_of_the_memory(wquant):
    model = _calibrated_tiny(wquant)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = adapter_for(model).layers(model)
    float_weights = {n: getattr(layers[0], f"w_{n}").clone() for n in layers[0].wq}
    codes_before = {n: layers[0].weight_codes(n)[0] for n in layers[0].wq}
    with torch.no_grad():
        ref = model(ids).logits
        before = sum(b.nbytes for b in layers[0].buffers() if b is not None)
        assert all(layer.pack() for layer in layers)
        after = sum(b.nbytes for b in layers[0].buffers() if b is not None)
        out = model(ids).logits
    assert torch.equal(out, ref)
    for n, w in float_weights.items():
        assert torch.equal(layers[0]._dequant(n), w)
        assert torch.equal(layers[0].weight_codes(n)[0], codes_before[n])
    weight_bytes = sum(w.nbytes for w in float_weights.values())
    assert before - after > 0.8 * weight_bytes  # 4-bit codes + scales instead of float32


def test_pack_refuses_unquantized_layers():
    model = random_llama()
    quantize_model(model, torch.zeros(0, 0, dtype=torch.long), get_method("fp16"), FP, CalibConfig())
    layer = adapter_for(model).layers(model)[0]
    assert layer.pack() is False and not layer.packed
    assert "4-bit symmetric per-channel" in layer.kernel_support()
