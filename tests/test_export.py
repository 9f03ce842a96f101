"""Quantized checkpoints: exact round trip through packed 4-bit safetensors, and refusal of bad checkpoints."""

import hashlib
import json
import shutil

import pytest
import torch

from conftest import random_llama
from flatquant.calibrate import CalibConfig, quantize_model
from flatquant.evaluate import perplexity
from flatquant.export import FORMAT, export, load_quantized
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


@pytest.mark.parametrize("method,wquant,group", [("flatquant", "rtn", 0), ("quarot", "gptq", 0), ("smoothquant", "rtn", 32)])
def test_export_then_load_gives_identical_model(tokenizer, tmp_path, method, wquant, group):
    qcfg = QuantConfig(w_group_size=group, lwc=method == "flatquant", lac=method == "flatquant")
    model = _quantized(tokenizer, method, wquant, qcfg)
    export(model, tokenizer, tmp_path, {"name": method})
    shard = next(tmp_path.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        assert f.get_tensor("layers.0.qkv.linears.q.codes").dtype == torch.uint8  # really 4-bit packed
    loaded, _ = load_quantized(tmp_path)
    assert all(layer.packed for layer in loaded.model.layers)  # kept as 4-bit codes in memory too
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(windows).logits, loaded(windows).logits)
    assert perplexity(model, windows) == perplexity(loaded, windows)


def test_a_16_bit_model_loads_back_in_its_own_dtype(tokenizer, tiny_llama_dir, tmp_path):
    """A model run in bfloat16 (as on a GPU, fp16 or bf16) exports its embeddings, norm and head in that dtype, and
    load_quantized rebuilds them so: the same logits to the last bit, not a float32 model that differs."""
    from flatquant.model import load_model

    model, _ = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    samples = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, samples, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=1, batch_size=2))
    export(model, tokenizer, tmp_path, {"name": "flatquant"})
    loaded, _ = load_quantized(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(windows).logits, loaded(windows).logits
    assert b.dtype == torch.bfloat16 and torch.equal(a, b)


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


def test_a_model_on_the_kernels_is_not_exported(tokenizer, tmp_path):
    """use_kernels re-packs the codes into the kernels' layout and drops the groups: export refuses, not a partial
    checkpoint that load_quantized could not rebuild."""
    model = _quantized(tokenizer, "flatquant")
    model.model.layers[1].use_kernels()
    with pytest.raises(ValueError, match="before use_kernels"):
        export(model, tokenizer, tmp_path, {"name": "flatquant"})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("quant,dtype", [({"w_bits": 12}, torch.int16), ({"w_bits": 8, "w_sym": False}, torch.int16),
                                         ({"w_bits": 3, "w_sym": False}, torch.int8)])
def test_wide_and_asymmetric_codes_round_trip(tokenizer, tmp_path, quant, dtype):
    """Codes beyond int8 (12-bit, asymmetric 8-bit: issue 19) are stored unpacked in a dtype that holds them, exactly."""
    model = _quantized(tokenizer, "rtn", qcfg=QuantConfig(**quant))
    export(model, tokenizer, tmp_path, {"name": "rtn"})
    from safetensors import safe_open

    with safe_open(next(tmp_path.glob("*.safetensors")), "pt") as f:
        assert f.get_tensor("layers.0.qkv.linears.q.codes").dtype == dtype
    loaded, _ = load_quantized(tmp_path)
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(windows).logits, loaded(windows).logits)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """A 2-layer RTN W4A4KV4 checkpoint; tests tamper with copies of it."""
    path = tmp_path_factory.mktemp("exported")
    export(_quantized(tokenizer, "rtn"), tokenizer, path, {"name": "rtn"})
    return path


@pytest.fixture
def checkpoint(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "ckpt")


def _rehash(path, name):
    """Record `name`'s current sha256 in quant_config.json, as a tool that rewrote both files would."""
    meta = json.loads((path / "quant_config.json").read_text())
    meta["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "quant_config.json").write_text(json.dumps(meta))


def test_every_file_is_checksummed(checkpoint):
    listed = json.loads((checkpoint / "quant_config.json").read_text())["sha256"]
    on_disk = {p.name for p in checkpoint.iterdir()} - {"quant_config.json"}
    assert set(listed) == on_disk and {"config.json", "tokenizer.json", "tokenizer_config.json"} <= on_disk


@pytest.mark.parametrize("layers", [3, 1])
def test_config_with_another_layer_count_is_refused(checkpoint, layers):
    """More layers than stored (would be randomly initialised) or fewer (an IndexError): the checksum refuses the
    edit, and a re-hashed edit still fails the cross-check against the stored layers, naming field and values."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    with pytest.raises(ValueError, match=r"config.json does not match its sha256"):
        load_quantized(checkpoint)
    _rehash(checkpoint, "config.json")
    with pytest.raises(ValueError, match=rf"config.json does not match the stored tensors: num_hidden_layers={layers} "
                                         r"but the checkpoint has 2"):
        load_quantized(checkpoint)


def test_config_with_another_hidden_size_is_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "intermediate_size": 100}))
    _rehash(checkpoint, "config.json")
    with pytest.raises(ValueError, match=r"hidden_size=128 but the checkpoint has 64 .*intermediate_size=100 but the checkpoint has 96"):
        load_quantized(checkpoint)


def test_tampered_or_added_tokenizer_files_are_refused(checkpoint):
    original = (checkpoint / "tokenizer_config.json").read_text()
    (checkpoint / "tokenizer_config.json").write_text(original.replace("}", ', "model_max_length": 7}', 1))
    with pytest.raises(ValueError, match=r"tokenizer_config.json does not match its sha256 .*truncated or tampered"):
        load_quantized(checkpoint)
    (checkpoint / "tokenizer_config.json").write_text(original)
    (checkpoint / "added_tokens.json").write_text("{}")
    with pytest.raises(ValueError, match=r"added_tokens.json.*not covered by the checksums"):
        load_quantized(checkpoint)
    (checkpoint / "added_tokens.json").unlink()
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_quantized(checkpoint)


def test_checkpoint_of_an_older_format_is_refused(checkpoint):
    meta = json.loads((checkpoint / "quant_config.json").read_text())
    (checkpoint / "quant_config.json").write_text(json.dumps({**meta, "format": "flatquant-checkpoint-v1"}))
    with pytest.raises(ValueError, match=rf"format 'flatquant-checkpoint-v1'.*reads only '{FORMAT}'; export the model again"):
        load_quantized(checkpoint)

