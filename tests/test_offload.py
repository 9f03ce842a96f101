"""Layer offloading: the same logits with the layers streamed from CPU memory, and at most two on the GPU."""

import pytest
import torch

from conftest import random_llama
from flatquant.adapters import adapter_for
from flatquant.calibrate import CalibConfig, quantize_model
from flatquant.methods import get_method
from flatquant.offload import LayerOffload, model_bytes
from flatquant.spec import QuantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer_devices(model):
    return {t.device.type for layer in adapter_for(model).layers(model) for t in layer.state_dict().values()}


@pytest.mark.parametrize("quantized", [False, True])
def test_offloaded_model_gives_the_same_logits_and_keeps_layers_on_cpu(quantized):
    model = random_llama(layers=3)
    if quantized:
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        quantize_model(model, ids, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=0, batch_size=2))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        off = LayerOffload(model, DEVICE)
        out = model(ids.to(DEVICE)).logits.cpu()
        out2 = model(ids.to(DEVICE)).logits.cpu()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5) and torch.equal(out, out2)
    assert _layer_devices(model) == {"cpu"}  # nothing left on the device after a forward
    assert off.copies >= 2 * 3  # every layer copied in once per forward (plus a prefetch of layer 0)
    assert adapter_for(model).embed(model).weight.device.type == DEVICE
    off.remove()
    with torch.no_grad():
        model.to("cpu")
        assert torch.allclose(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_quantize_model_returns_layers_to_where_they_were():
    """Calibrating a model whose layers are on the CPU leaves the quantized (packed) layers on the CPU."""
    model = random_llama(layers=2)
    before = model_bytes(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    LayerOffload(model, DEVICE).remove()  # the state offloading leaves: layers on the CPU, the rest on DEVICE
    quantize_model(model, ids, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=1, batch_size=2, device=DEVICE))
    layers = adapter_for(model).layers(model)
    assert _layer_devices(model) == {"cpu"} and all(layer.packed for layer in layers)
    layer_bytes = sum(t.nbytes for layer in layers for t in layer.state_dict().values())
    assert layer_bytes < 0.5 * before  # 4-bit codes (the fp32 originals are gone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_peak_memory_is_two_layers():
    model = random_llama(layers=8, hidden=1024, inter=4096, heads=8, kv_heads=8).half()
    per_layer = model_bytes(adapter_for(model).layers(model)[0])
    LayerOffload(model, "cuda")
    ids = torch.randint(0, 256, (1, 64), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(ids)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 3 * per_layer


def _peak_above_now(fn):
    """(fn(), peak GPU memory allocated while it ran minus what was allocated before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_model_calibrates_and_runs_in_gpu_memory_that_does_not_grow_with_depth():
    """What lets a 70B model be calibrated and evaluated on one GPU (on an H100: 3 random LLaMA-3-70B-shaped bf16
    layers of 1.6 GiB held in CPU memory, results/gpu/offload_70b_shaped.json): calibrating a model whose layers
    live in CPU memory, and the forward of the quantized model streamed by LayerOffload, need the GPU memory of
    one layer's work whatever the depth. Here 70B's proportions at hidden 1024, 2 and 8 bf16 layers: the peaks
    above what was allocated before differ by less than three quantized layers (one layer left on the GPU per
    layer calibrated or run would add six; a copy whose release waits on the GPU stream is about one)."""
    peaks, ids = {}, torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(1))
    samples = torch.randint(0, 256, (8, 256), generator=torch.Generator().manual_seed(0))
    for depth in (2, 8):
        model = random_llama(layers=depth, hidden=1024, inter=3584, heads=16, kv_heads=2).to(torch.bfloat16)
        LayerOffload(model, "cuda").remove()  # layers in pinned CPU memory, embeddings, norm and head on the GPU
        ccfg = CalibConfig(epochs=1, batch_size=4, device="cuda", amp=True)
        reports, calib = _peak_above_now(lambda: quantize_model(model, samples, get_method("flatquant"), QuantConfig(), ccfg))
        assert _layer_devices(model) == {"cpu"} and all(layer.packed for layer in adapter_for(model).layers(model))
        assert all(torch.isfinite(torch.tensor([r.init_loss, r.final_loss])).all() for r in reports)
        off = LayerOffload(model, "cuda")
        with torch.no_grad():
            logits, forward = _peak_above_now(lambda: model(ids.cuda()).logits)
        assert torch.isfinite(logits).all() and _layer_devices(model) == {"cpu"}
        peaks[depth] = {"calibrate": calib, "forward": forward}
        quantized_layer = model_bytes(adapter_for(model).layers(model)[0])
        off.remove()
        del model, off, logits
        torch.cuda.empty_cache()
    for phase in ("calibrate", "forward"):
        assert peaks[8][phase] - peaks[2][phase] < 3 * quantized_layer, (phase, peaks, quantized_layer)


def test_lazy_model_reads_layers_from_disk_and_matches_eager_loading(tiny_llama_dir):
    """offload=disk: layers stay on the meta device, stream from the safetensors file, and give the same logits;
    calibration reads each layer when it gets to it and gives the same quantized model."""
    from flatquant.lazy import is_lazy, load_lazy
    from flatquant.model import load_model

    eager, _ = load_model(str(tiny_llama_dir))
    lazy, _ = load_lazy(tiny_llama_dir, torch.float32)
    layers = adapter_for(lazy).layers(lazy)
    assert all(is_lazy(layer) for layer in layers) and _layer_devices(lazy) == {"meta"}
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    off = LayerOffload(lazy, DEVICE)
    with torch.no_grad():
        ref, out = eager(ids).logits, lazy(ids.to(DEVICE)).logits.cpu()
    assert torch.equal(out, ref)
    assert _layer_devices(lazy) == {"meta"}  # read for the forward, dropped afterwards
    off.remove()
    samples = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (eager, lazy):
        quantize_model(model, samples, get_method("flatquant"), QuantConfig(), CalibConfig(epochs=1, batch_size=2, device=DEVICE))
    assert _layer_devices(lazy) == {"cpu"} and not any(is_lazy(layer) for layer in layers)
    LayerOffload(lazy, DEVICE)
    with torch.no_grad():
        assert torch.equal(lazy(ids.to(DEVICE)).logits.cpu(), eager.to(DEVICE)(ids.to(DEVICE)).logits.cpu())


def test_lazy_loading_refuses_what_it_cannot_read(tmp_path):
    from flatquant.lazy import load_lazy

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_lazy(tmp_path)
