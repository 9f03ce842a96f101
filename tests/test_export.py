"""Quantized checkpoints: exact round trip through packed 4-bit safetensors, and refusal of bad checkpoints."""

import json

import pytest
import torch

from conftest import random_llama
from flatquant.calibrate import CalibConfig, quantize_model
from flatquant.evaluate import perplexity
from flatquant.export import export, load_quantized
from flatquant.quantizers import pack_int4, unpack_int4
from flatquant.methods import get_method
from flatquant.spec import QuantConfig


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def _quantized(tokenizer, method, wquant="rtn", qcfg=None):
    model = random_llama(layers=2, vocab=len(tokenizer))
    samples = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, samples, get_method(method), qcfg or QuantConfig(), CalibConfig(epochs=1, batch_size=2, wquant=wquant))
    return model


def test_pack_unpack_int4_round_trip():
    for qmin in (-8, 0):
        codes = torch.randint(qmin, qmin + 16, (5, 12))
        packed = pack_int4(codes, qmin)
        assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
        assert torch.equal(unpack_int4(packed, qmin), codes.to(torch.int16))


@pytest.mark.parametrize("method,wquant,group", [("flatquant", "rtn", 0), ("quarot", "gptq", 0), ("smoothquant", "rtn", 32)])
def test_export_then_load_gives_identical_model(tokenizer, tmp_path, method, wquant, group):
    qcfg = QuantConfig(w_group_size=group, lwc=method == "flatquant", lac=method == "flatquant")
    model = _quantized(tokenizer, method, wquant, qcfg)
    export(model, tokenizer, tmp_path, {"name": method})
    shard = next(tmp_path.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        assert f.get_tensor("layers.0.w_q.codes").dtype == torch.uint8  # really 4-bit packed
    loaded, _ = load_quantized(tmp_path)
    assert all(layer.packed for layer in loaded.model.layers)  # kept as 4-bit codes in memory too
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(windows).logits, loaded(windows).logits)
    assert perplexity(model, windows) == perplexity(loaded, windows)


def test_tampered_truncated_and_mismatched_checkpoints_are_refused(tokenizer, tmp_path):
    export(_quantized(tokenizer, "rtn"), tokenizer, tmp_path, {"name": "rtn"})
    with pytest.raises(ValueError, match="holds a rtn checkpoint, not flatquant"):
        load_quantized(tmp_path, expect_method="flatquant")
    with pytest.raises(ValueError, match="quant.w_bits=4, expected 8"):
        load_quantized(tmp_path, expect_quant={"w_bits": 8})
    shard = next(tmp_path.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or tampered"):
        load_quantized(tmp_path)
    (tmp_path / "quant_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="quant_config.json is missing"):
        load_quantized(tmp_path)


def test_unquantized_model_is_not_exported(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs a quantized model"):
        export(random_llama(vocab=len(tokenizer)), tokenizer, tmp_path, {"name": "fp16"})
