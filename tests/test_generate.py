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


def _kw(model, cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}, whichever this transformers takes (flatquant.generate)."""
    from flatquant.generate import cache_kwarg

    return {cache_kwarg(model): cache}


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
        model(ids[:, :6], **_kw(model, cache), use_cache=True)
        tail = model(ids[:, 6:], **_kw(model, cache), use_cache=True, position_ids=torch.arange(6, 9)[None]).logits
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


def _token_list_tokenizer(eos: int | None = None):
    """A stand-in tokenizer: every prompt is the ids [5, 6, 7]; decode writes the id list as text."""
    return type("Tok", (), dict(pad_token_id=0, eos_token_id=eos, decode=lambda self, ids, **kw: str(ids.tolist()),
                                __call__=lambda self, text, return_tensors: {"input_ids": torch.tensor([[5, 6, 7]])}))()


# ---- the 4-bit cache (flatquant.cache.QuantKVCache) --------------------------------------------------------------
def _generate(model, prompt, cache, n=6):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                              use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                              **_kw(model, cache))


@pytest.mark.parametrize("method", ["flatquant", "rtn"])
def test_packed_cache_generates_what_the_fake_quant_cache_does(method):
    """QuantKVCache keeps only 4-bit codes and quantizes K/V itself with the calibrated quantizer: the same greedy
    tokens and the same logits as the fake-quantized model with a DynamicCache, at about 0.3× fp16's bytes."""
    from transformers import DynamicCache

    from flatquant.cache import QuantKVCache

    model = _quantized(method)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = _generate(model, prompt, DynamicCache(config=model.config))
    packed = QuantKVCache()
    out = _generate(model, prompt, packed)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())
    # 13 tokens were written (the last generated token is never fed back); head_dim 32: (16 + 8) / (2·32) of fp16
    hd, kv_heads, layers, tokens = 32, 2, 2, 7 + 6 - 1
    fp16_bytes = 2 * layers * 2 * prompt.shape[0] * kv_heads * tokens * hd
    assert packed.nbytes() == fp16_bytes * (hd // 2 + 8) // (2 * hd)
    assert packed.held_bytes() * tokens == packed.nbytes() * (7 + 256)  # allocated at prefill: the prompt + 256 headroom
    assert all(layer.k[0].dtype == torch.uint8 for layer in packed.layers)


def test_packed_cache_decode_attention_matches_sdpa(monkeypatch):
    """The one-token steps through decode_attention over the codes (its PyTorch reference on a CPU, the Triton
    kernel on a GPU: tests/test_kv_cache.py) instead of dequantizing the cache: the same tokens and logits."""
    from flatquant.cache import QuantKVCache, QuantKVLayer

    model = _quantized("flatquant")
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(8))
    ref = _generate(model, prompt, QuantKVCache())
    calls = []
    monkeypatch.setattr(QuantKVLayer, "decodes", lambda self, q: calls.append(q.shape) or True)
    out = _generate(model, prompt, QuantKVCache())
    assert len(calls) == 2 * 5 and all(shape == (3, 4, 1, 32) for shape in calls)  # 2 layers × 5 decode steps
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())


def test_packed_cache_refuses_what_it_cannot_hold():
    from flatquant.cache import QuantKVCache
    from flatquant.quantizers import QuantSpec

    layer = QuantKVCache().layer(0)
    x = torch.randn(1, 2, 3, 32)
    with pytest.raises(ValueError, match="4-bit asymmetric per-head keys"):
        layer.append(x, x, QuantSpec(16), QuantSpec(4, False, "head", 32))
    with pytest.raises(ValueError, match="per-head values"):
        layer.append(x, x, QuantSpec(4, False, "head", 32), QuantSpec(4, True, "head", 32))


def test_generate_uses_the_packed_cache_where_it_can(monkeypatch):
    """generate() hands model.generate a QuantKVCache for a QuantLayer model (and the layers really write to it), and
    leaves transformers' DynamicCache to other models and to packed_cache=False."""
    from conftest import random_llama
    from flatquant.cache import QuantKVLayer
    from flatquant.generate import packed_cache_for

    assert packed_cache_for(random_llama()) is None  # transformers layers: DynamicCache
    writes = []
    append = QuantKVLayer.append
    monkeypatch.setattr(QuantKVLayer, "append",
                        lambda self, *a, **kw: writes.append(a[0].shape) or append(self, *a, **kw))
    model = _quantized("flatquant")
    tok = _token_list_tokenizer(eos=0)
    packed = generate(model, tok, ["x"], max_new_tokens=3)
    assert len(writes) == 2 * 3  # 2 layers × (prefill + 2 decode steps)
    assert generate(model, tok, ["x"], max_new_tokens=3, packed_cache=False) == packed and len(writes) == 6


def test_fixed_capacity_cache_generates_what_the_growing_one_does():
    """QuantKVCache(max_length) allocates its capacity once (as a CUDA graph needs) and counts tokens on the device
    (pos): the same tokens and logits as the growing cache; what does not fit is refused."""
    from flatquant.cache import QuantKVCache

    model = _quantized("flatquant")
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = _generate(model, prompt, QuantKVCache())
    fixed = QuantKVCache(max_length=12)
    out = _generate(model, prompt, fixed)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)
    assert all(layer.capacity == 12 and layer.length == 12 and int(layer.pos) == 12 for layer in fixed.layers)
    with pytest.raises(ValueError, match=r"is full: 12 tokens cached, 1 more"), torch.no_grad():
        model(out.sequences[:, -1:], use_cache=True, position_ids=torch.full((2, 1), 12), **_kw(model, fixed))
    with pytest.raises(ValueError, match="do not fit"):
        _generate(model, prompt, QuantKVCache(max_length=6), n=1)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        QuantKVCache(max_length=0)


def test_fixed_capacity_cache_decodes_over_the_codes_despite_a_mask(monkeypatch):
    """While a CUDA graph is captured transformers builds a 4-D mask even for one-token steps; a fixed-capacity
    QuantKVCache (unpadded sequences of one length) still attends through decode() then, with the same logits as
    the growing cache's masked path."""
    from flatquant.cache import QuantKVCache, QuantKVLayer

    model = _quantized("flatquant")
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    decoded = []
    monkeypatch.setattr(QuantKVLayer, "decodes", lambda self, q: True)
    decode = QuantKVLayer.decode
    monkeypatch.setattr(QuantKVLayer, "decode", lambda self, q: decoded.append(self.max_length) or decode(self, q))
    logits = []
    for cache in (QuantKVCache(), QuantKVCache(max_length=12)):
        with torch.no_grad():
            model(prompt, use_cache=True, **_kw(model, cache))
            mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
            logits.append(model(prompt[:, :1], attention_mask=mask, position_ids=torch.full((2, 1), 7),
                                use_cache=True, **_kw(model, cache)).logits)
    assert decoded == [12, 12]  # both layers of the fixed cache only
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["fp", "w4a4", "w4a4-decode-kernel-path"])
def test_greedy_decode_picks_what_generate_picks(which, monkeypatch):
    """flatquant.generate.greedy_decode (the step the benchmark replays from a CUDA graph; eager here) after a
    prefill into a fixed-capacity cache — transformers' StaticCache for the FP model, QuantKVCache(max_length) for
    the quantized one, also through decode() over the device position — picks model.generate's tokens."""
    from conftest import random_llama
    from transformers import StaticCache

    from flatquant.cache import QuantKVCache, QuantKVLayer
    from flatquant.generate import greedy_decode

    if which.endswith("kernel-path"):
        monkeypatch.setattr(QuantKVLayer, "decodes", lambda self, q: True)
    model = random_llama(hidden=128, inter=192, heads=4, kv_heads=2, layers=2).eval() if which == "fp" \
        else _quantized("flatquant")
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(9))
    want = _generate(model, prompt, None, n=6).sequences[:, 7:]
    cache = StaticCache(config=model.config, max_cache_len=16) if which == "fp" else QuantKVCache(max_length=16)
    with torch.no_grad():
        first = model(prompt, use_cache=True, **_kw(model, cache)).logits[:, -1:].argmax(-1)
    got = greedy_decode(model, cache, first, 7, 5, cuda_graph=False)
    assert torch.equal(torch.cat([first, got], dim=1), want)
    with pytest.raises(ValueError, match="do not fit in the cache's 16"):
        greedy_decode(model, cache, first, 12, 5)
    with pytest.raises(ValueError, match="the cache is full: 16 tokens of its 16"):
        greedy_decode(model, cache, first, 16, 1)


def test_generate_through_the_fixed_cache_decoder_gives_generate_s_text(smollm2):
    """generate(cuda_graph=True) (prefill into a fixed-capacity cache, then GreedyDecoder: a CUDA graph on a GPU, the
    same steps eagerly here) gives model.generate's greedy text: the FP default model (StaticCache) and W4A4 layers
    (QuantKVCache(max_length)); tokens after the first EOS are cut as model.generate stops there."""
    from flatquant.generate import fixed_cache_greedy

    model, tok = smollm2
    prompts = ["The capital of Germany is", "Water boils at"]
    loop = generate(model, tok, prompts, 6, cuda_graph=False)
    assert generate(model, tok, prompts, max_new_tokens=6, cuda_graph=True) == loop
    quant = _quantized("flatquant")
    fake = _token_list_tokenizer()
    texts = generate(quant, fake, ["x"], max_new_tokens=5, cuda_graph=True)
    assert texts == generate(quant, fake, ["x"], max_new_tokens=5, cuda_graph=False)
    full = fixed_cache_greedy(quant, torch.tensor([[5, 6, 7]]), 5)
    assert str(full[0].tolist()) == texts[0]
    eos = int(full[0, 2])
    cut = fixed_cache_greedy(quant, torch.tensor([[5, 6, 7]]), 5, eos_token_id=eos)
    first = int((full[0] == eos).nonzero()[0])
    assert torch.equal(cut, full[:, : first + 1])


def test_generate_takes_the_graph_by_default_only_on_a_gpu(monkeypatch):
    """cuda_graph=None (the default) decodes with the fixed-cache greedy loop where the model's device is CUDA and
    with model.generate elsewhere: the choice by device, then generate() on the CPU (model.generate) and with
    cuda_graph=True (the fixed-cache loop)."""
    import flatquant.generate as gen

    assert gen.default_cuda_graph(torch.device("cuda", 1)) and gen.default_cuda_graph("cuda")
    assert not gen.default_cuda_graph("cpu")
    calls = []
    monkeypatch.setattr(gen, "fixed_cache_greedy", lambda *a, **k: calls.append("graph") or torch.tensor([[1]]))
    quant = _quantized("rtn")
    generate(quant, _token_list_tokenizer(), ["x"], max_new_tokens=2)
    assert calls == []
    generate(quant, _token_list_tokenizer(), ["x"], max_new_tokens=2, cuda_graph=True)
    assert calls == ["graph"]


def test_eval_cuda_graph_reaches_generate(monkeypatch):
    """eval.cuda_graph (pipeline/eval_generate.py; default true) generates through the fixed-cache decoder, false
    through model.generate: the same texts."""
    from types import SimpleNamespace

    import pipeline.eval_generate as stage

    seen = []
    def spy(*args, **kw):
        seen.append((kw["cuda_graph"], generate(*args, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(stage, "generate", spy)
    tok = _token_list_tokenizer()
    ctx = SimpleNamespace(eval_model=lambda: _quantized("flatquant"), tokenizer=tok, device="cpu", tracker=None)
    outs = [stage.run({"eval": {"prompts": ["x"], "max_new_tokens": 4, **extra}}, ctx)
            for extra in ({"cuda_graph": False}, {})]
    assert [g for g, _ in seen] == [False, True] and seen[0][1] == seen[1][1]
    assert all(o["eval_generate/seconds"] > 0 for o in outs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["fp16", "w4a4-kernels"])
def test_decode_replayed_from_a_cuda_graph_equals_the_eager_steps_gpu(which):
    """GreedyDecoder replaying one captured step (the position read on the device by the cache writes, RoPE and
    decode attention) against the same steps run eagerly from an identical prefill: the same tokens, and for the
    packed cache the same bytes in it (its host-side lengths synced afterwards)."""
    from conftest import random_llama
    from transformers import StaticCache

    from flatquant.cache import QuantKVCache
    from flatquant.generate import GreedyDecoder

    if which == "fp16":
        model = random_llama(hidden=128, inter=192, heads=4, kv_heads=2, layers=2).eval().half().cuda()
        make = lambda: StaticCache(config=model.config, max_cache_len=40)
    else:
        model = _quantized("flatquant").cuda()
        for layer in model.model.layers:
            layer.use_kernels()
        make = lambda: QuantKVCache(max_length=40)
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(5)).cuda()
    runs = []
    for graph in (False, True):
        cache = make()
        with torch.no_grad():
            first = model(prompt, use_cache=True, **_kw(model, cache)).logits[:, -1:].argmax(-1)
        decoder = GreedyDecoder(model, cache, first, 9, cuda_graph=graph)
        assert (decoder.graph is not None) == graph
        runs.append((torch.cat([decoder(4), decoder(8)], dim=1), cache))
    (eager, c0), (graphed, c1) = runs
    assert torch.equal(graphed, eager)
    if which != "fp16":
        assert all(layer.length == 9 + 12 and int(layer.pos) == 21 for layer in c1.layers)
        for a, b in zip(c0.layers, c1.layers):
            for x, y in zip((*a.k, *a.v), (*b.k, *b.v)):
                assert torch.equal(x[:, :, :21], y[:, :, :21])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_model_on_the_packed_cache_generates_the_fake_quant_tokens_gpu():
    """On a GPU: the W4A4 kernels with QuantKVCache (kv_quant_pack writes, decode_attention reads the codes) against
    the fake-quantized model with a DynamicCache: the same greedy tokens, logits within 2 % (fp32)."""
    import copy

    from transformers import DynamicCache

    from flatquant.cache import QuantKVCache

    model = _quantized("flatquant").cuda()
    real = copy.deepcopy(model)
    for layer in real.model.layers:
        layer.use_kernels()
    prompt = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(5)).cuda()
    ref = _generate(model, prompt, DynamicCache(config=model.config), n=5)
    cache = QuantKVCache()
    out = _generate(real, prompt, cache, n=5)
    assert cache.layers[0].k[0].is_cuda and cache.layers[0].length == 9 + 5 - 1
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert float((a - b).norm() / b.norm()) < 2e-2


def test_bench_models_share_weights_and_cache_each_layer_apart():
    """flatquant.bench_model copies one converted layer to every position: each copy must write its own cache layer
    (layer_idx), so that cached decoding equals a full forward."""
    from flatquant.bench_model import build_models
    from flatquant.cache import QuantKVCache
    from flatquant.quant_layer import QuantLayer

    fp, ours = build_models(dict(hidden=64, intermediate=96, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3),
                            vocab=256, device="cpu")
    ours = ours.float()
    layers = ours.model.layers
    assert all(isinstance(l, QuantLayer) and l.on_kernels and l.layer_idx == i for i, l in enumerate(layers))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    cache = QuantKVCache()
    with torch.no_grad():
        full = ours(ids).logits
        ours(ids[:, :8], **_kw(ours, cache), use_cache=True)
        last = ours(ids[:, 8:], **_kw(ours, cache), use_cache=True, position_ids=torch.full((2, 1), 8)).logits
    assert len(cache.layers) == 3 and all(layer.length == 9 for layer in cache.layers)
    assert torch.allclose(last[:, 0], full[:, 8], rtol=1e-4, atol=1e-4)
