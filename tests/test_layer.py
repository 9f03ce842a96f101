"""CalibLayer and QuantLayer: equal to the transformers layer at 16 bits, converting changes nothing, and the
deployed layer's packed codes are exactly the fake-quantized weights calibration trained against."""

import copy

import pytest
import torch

from conftest import random_llama
from flatquant.adapters import GROUPS, adapter_for
from flatquant.calibrate import layer_inputs, quantize_model, CalibConfig
from flatquant.convert import convert, hessians
from flatquant.data import eval_windows, load_tokens
from flatquant.evaluate import perplexity
from flatquant.gptq import HessianAccumulator
from flatquant.layer import CalibLayer
from flatquant.methods import get_method
from flatquant.quant_layer import QuantLayer, QuantWeight, rms_norm
from flatquant.quantizers import fake_quant
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
        calib = CalibLayer(parts, FP, {})
        out, deployed = calib(inps, position_embeddings=pe), convert(calib)(inps, position_embeddings=pe)
    assert rel(out, ref) < 1e-6 and rel(deployed, ref) < 1e-6


def test_converted_equals_calibration_layer_and_fp_at_16_bits():
    """Transforms far from the identity, 16-bit quantizers: CalibLayer = its QuantLayer = FP layer (fp32, rel < 1e-4)."""
    model = random_llama()
    layer, parts, inps, pe = _layer_and_inputs(model)
    q = CalibLayer(parts, FP, _random_flatquant_transforms(parts))
    with torch.no_grad():
        ref = layer(inps, position_embeddings=pe)
        unmerged = q(inps, position_embeddings=pe)
        merged = convert(q)(inps, position_embeddings=pe)
        again = q(inps, position_embeddings=pe)
    assert rel(unmerged, ref) < 1e-4
    assert rel(merged, unmerged) < 1e-4
    assert torch.equal(again, unmerged)  # convert leaves the calibration layer as it was


def test_converted_equals_calibration_layer_at_4_bits():
    """With real quantizers the QuantLayer computes the same function up to rare rounding-boundary flips."""
    model = random_llama()
    layer, parts, inps, pe = _layer_and_inputs(model)
    q = CalibLayer(parts, QuantConfig(), _random_flatquant_transforms(parts))
    with torch.no_grad():
        unmerged = q(inps, position_embeddings=pe)
        merged = convert(q)(inps, position_embeddings=pe)
        ref = layer(inps, position_embeddings=pe)
    assert rel(merged, unmerged) < 0.1 * rel(unmerged, ref)


def test_rtn_codes_are_the_fake_quantized_merged_weights():
    """convert(…, "rtn"): each weight's codes dequantize exactly to fake_quant of the float64-merged weight with the
    learned LWC clip, the values calibration's forward trains against."""
    model = random_llama()
    _, parts, _, _ = _layer_and_inputs(model)
    calib = CalibLayer(parts, QuantConfig(), _random_flatquant_transforms(parts))
    with torch.no_grad():
        for quantizer in calib.wq.values():
            quantizer.clip_logit.uniform_(0, 3)
        qlayer = convert(calib, "rtn")
        for n, w in qlayer.weights().items():
            merged = calib.transformed_weight(n, torch.float64).float()
            assert torch.equal(w, fake_quant(merged, calib.qcfg.weight_spec(), calib.wq[n].grouped_clip()))


def test_gptq_hessians_come_from_the_groups_real_inputs():
    """The pre-hook Hessian of q/k/v's input is 2/N·XᵀX of X = quantize(norm(x)·P), computed here by hand."""
    model = random_llama()
    _, parts, inps, pe = _layer_and_inputs(model)
    qlayer = convert(CalibLayer(parts, QuantConfig(), _random_flatquant_transforms(parts)))
    with torch.no_grad():
        h = hessians(qlayer, [inps[:2], inps[2:]], pe)
        x = qlayer.qkv.aq(qlayer.qkv.transform(rms_norm(inps, qlayer.norm1, qlayer.eps1)))
    acc = HessianAccumulator(x.shape[-1])
    acc.add_batch(x[:2])
    acc.add_batch(x[2:])
    assert set(h) == set(GROUPS) and torch.allclose(h["qkv"], acc.hessian, rtol=1e-5, atol=1e-6)
    assert h["down"].shape == (model.config.intermediate_size,) * 2


def test_16bit_identity_model_perplexity_equals_fp(smollm2):
    """The real default model, all layers swapped for 16-bit identity QuantLayers: same perplexity."""
    model, tok = smollm2
    windows = eval_windows(load_tokens(tok, "wikitext2", "test", cache_dir=None)[:1024], 256, max_windows=2)
    fp = perplexity(model, windows)
    quant = copy.deepcopy(model)
    quantize_model(quant, torch.zeros(0, 0, dtype=torch.long), get_method("rtn"), FP, CalibConfig())
    assert isinstance(adapter_for(quant).layers(quant)[0], QuantLayer)
    assert abs(perplexity(quant, windows) / fp - 1) < 1e-5
    assert 5 < fp < 200


def _calibrated_tiny(wquant="rtn", seed=0):
    """A 2-layer random LLaMA calibrated by FlatQuant (one epoch) at W4A4KV4."""
    model = random_llama(seed=seed)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))
    quantize_model(model, ids, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=1, batch_size=2, wquant=wquant))
    return model


def test_gptq_codes_are_exactly_the_gptq_weights(monkeypatch):
    """convert(…, "gptq") keeps each weight as codes that dequantize to exactly what gptq_quantize returned."""
    import flatquant.convert as conv

    returned = []
    gptq = conv.gptq_quantize
    monkeypatch.setattr(conv, "gptq_quantize", lambda *a, **k: returned.append(gptq(*a, **k)) or returned[-1])
    model = _calibrated_tiny("gptq")
    layers = adapter_for(model).layers(model)
    assert len(returned) == 7 * len(layers)
    got = [w for layer in layers for w in layer.weights().values()]
    assert all(layer.packed for layer in layers) and all(torch.equal(a, b) for a, b in zip(got, returned))


@pytest.mark.parametrize("wquant", ["rtn", "gptq"])
def test_packed_weights_give_identical_outputs_in_an_eighth_of_the_memory(wquant):
    """Forward from the codes equals forward from float32 copies of their values (dequantizing on the fly loses
    nothing), in an eighth of the weight memory. That the values are the quantizer's own: test_rtn_codes_… and
    test_gptq_codes_…."""
    model = _calibrated_tiny(wquant)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = adapter_for(model).layers(model)
    assert all(layer.packed for layer in layers)
    packed_bytes = sum(b.nbytes for b in layers[0].buffers() if b is not None)
    unpacked = copy.deepcopy(model)
    for layer in adapter_for(unpacked).layers(unpacked):
        for group in layer.groups().values():
            for n, w in group.linears.items():
                group.linears[n] = QuantWeight(w.spec, weight=w.dequantized(), bias=w.bias)
    float_bytes = sum(b.nbytes for b in adapter_for(unpacked).layers(unpacked)[0].buffers() if b is not None)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unpacked(ids).logits)
    weight_bytes = sum(w.nbytes for w in adapter_for(unpacked).layers(unpacked)[0].weights().values())
    assert float_bytes - packed_bytes > 0.8 * weight_bytes  # 4-bit codes + scales instead of float32


def test_unquantized_layers_keep_float_weights():
    model = random_llama()
    quantize_model(model, torch.zeros(0, 0, dtype=torch.long), get_method("fp16"), FP, CalibConfig())
    layer = adapter_for(model).layers(model)[0]
    assert not layer.packed and all(w.weight is not None for w in layer.quant_weights().values())
    assert "4-bit symmetric per-channel" in layer.kernel_support()
