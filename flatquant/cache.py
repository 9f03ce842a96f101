"""A real 4-bit K/V cache for transformers' generation loop: codes two per byte, per-head scales and zeros.

Usage:
    cache = QuantKVCache()
    out = model.generate(ids, cache=cache, max_new_tokens=32)   # a QuantLayer model (past_key_values= in older
                                                                # transformers: flatquant.generate.cache_kwarg)
    cache.nbytes()                                                        # what the cache holds, in bytes

Each QuantLayer's attention hands this cache its K before RoPE (with the rotary tables and the learned K transform's
matrix) and V, both before the K/V quantizers, with the quantizers' specs; the cache quantizes them itself, with
the calibrated quantizer (asymmetric 4-bit per head, the kv clip ratio), and keeps only the codes: codes
(B, Hkv, T, D/2) uint8 with scale and zero (B, Hkv, T) float32, the layout of flatquant/kernels/kv_cache.py
(4 + 64/D bits a value, 0.28× fp16's bytes at D = 128, 0.31× at D = 64). Attention then reads it two ways:
- prefill (or any step with a mask, or without CUDA): the cache dequantizes all it holds to the compute dtype and
  PyTorch's SDPA attends, so in float32 the outputs equal those of the fake-quantized model with a DynamicCache but
  for the order of fp32 sums (below);
- decode (one new token per sequence, no mask, on a GPU with Triton): `decode_attention` (flash decoding) attends
  over the codes, dequantizing tiles on chip, and never materialises K/V.
K's codes are written by `rope_k_quant_pack` (RoPE, ·Tk and the quantizer in one Triton kernel, rope(k)·Tk held in
fp32; the fake-quantized layer rounds that product to the compute dtype first, so in fp16/bf16 the cache's K is the
more accurate of the two), V's by `kv_quant_pack` (its kernel and its reference, flatquant.quantizers.quantize,
agree bit for bit); in a one-token step the attention's q (RoPE, ·Tk⁻ᵀ) and the K and V writes run in one launch
(`rope_qkv_write`, the same results); without Triton their PyTorch references run (tests/test_kv_cache.py);
`kv_dequant` reads them back. On the GPU codes can also differ from the fake-quantized model's (PyTorch's CUDA quantizer) where a value
sits on a rounding boundary (flatquant/kernels/fused.py says why). Storage is allocated with 256 tokens of headroom beyond what is written and grows by doubling, so a prefill followed by decode steps
copies nothing until the headroom is used; `nbytes` counts the tokens written, `held_bytes` what is allocated.
`QuantKVCache(max_length=N)` instead allocates N tokens once and never moves them; each layer counts its tokens on
the device (`pos`: writes go there, decode attends over that many), so one CUDA graph of a decode step replays at
every position (flatquant.generate.GreedyDecoder; `sync()` brings the host-side lengths up to date afterwards).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from flatquant.quantizers import QuantSpec

HEADROOM = 256  # tokens allocated beyond what is written: decode steps after a prefill append without copying


def check_spec(spec: QuantSpec, head_dim: int, which: str) -> None:
    if (spec.bits, spec.sym, spec.granularity, spec.group_size) != (4, False, "head", head_dim):
        raise ValueError(f"QuantKVCache stores 4-bit asymmetric per-head {which} (quant.{which[0]}_bits=4, "
                         f"{which[0]}_sym=false), not {spec}; generate with transformers' DynamicCache instead")


class QuantKVLayer(DynamicLayer):
    """One decoder layer's packed K/V. `length` tokens of `capacity` are valid; the same for every sequence.

    `pos` (a one-element int32 tensor on the cache's device) counts the tokens written, like `length`, but on the
    device: writes go to token pos[0] on and advance it there, and decode attends over pos[0] tokens, so one CUDA
    graph of a decode step replays correctly at every position (`length`, the host's copy, then lags until
    `QuantKVCache.sync`). With a `max_length` the capacity is fixed (allocated at the first write, never moved),
    as a graph needs; without one it grows."""

    is_croppable = False  # crop / beam search / batch reordering are refused below

    def __init__(self, max_length: int | None = None):
        super().__init__()
        self.k = self.v = None  # (codes, scale, zero) each, (B, H, capacity, D/2) and (B, H, capacity)
        self.length, self.capacity, self.max_length = 0, 0, max_length
        self.pos: torch.Tensor | None = None
        self.specs: tuple[QuantSpec, QuantSpec] | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.pos = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def _grow(self, b: int, h: int, d: int, need: int) -> None:
        if self.max_length is not None:
            if self.capacity:
                raise ValueError(f"QuantKVCache(max_length={self.max_length}) is full: {self.length} tokens cached, "
                                 f"{need - self.length} more given")
            if need > self.max_length:
                raise ValueError(f"{need} tokens do not fit in QuantKVCache(max_length={self.max_length})")
        cap = self.max_length or max(need + HEADROOM, 2 * self.capacity)
        fresh = []
        for old in (self.k, self.v):
            new = (torch.empty(b, h, cap, d // 2, dtype=torch.uint8, device=self.device),
                   torch.empty(b, h, cap, dtype=torch.float32, device=self.device),
                   torch.empty(b, h, cap, dtype=torch.float32, device=self.device))
            if old is not None:
                for n, o in zip(new, old):
                    n[:, :, : self.length].copy_(o[:, :, : self.length])
            fresh.append(new)
        self.k, self.v = fresh
        self.capacity = cap

    def append(self, k: torch.Tensor, v: torch.Tensor, k_spec: QuantSpec, v_spec: QuantSpec,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None, tk: torch.Tensor | None = None,
               q: torch.Tensor | None = None, tq: torch.Tensor | None = None) -> torch.Tensor | None:
        """k, v: (B, Hkv, s, D) before quantization, in the compute dtype. rope: None when k is final (after RoPE and
        its transform); else the (cos, sin) tables of these s tokens ((s, D) or (B, s, D), as the model's rotary
        embedding gives them) and k is taken before RoPE: RoPE, ·tk (a (D, D) matrix, or None) and the quantizer
        run in one kernel (``rope_k_quant_pack``; RoPE rounded to k's dtype, rope(k)·tk held in fp32).
        q: optionally these tokens' queries (B, Hq, s, D) before RoPE (with rope): returned after RoPE and ·tq (a
        (D, D) matrix, or None) as ``rope_transform`` computes them, the three written by one launch
        (``rope_qkv_write``); None without q."""
        from flatquant.kernels.kv_cache import kv_quant_pack, rope_k_quant_pack, rope_qkv_write  # they import triton

        if not self.is_initialized:
            self.lazy_initialization(k, v)
        b, h, s, d = k.shape
        if self.specs is None:
            check_spec(k_spec, d, "keys")
            check_spec(v_spec, d, "values")
            self.specs = (k_spec, v_spec)
        if self.length + s > self.capacity:
            self._grow(b, h, d, self.length + s)
        if q is not None and rope is None:
            raise ValueError("q is written with RoPE: give rope= too")
        out = None
        if q is not None:
            out = rope_qkv_write(q, k, v, *rope, tq, tk, k_spec.clip_ratio, v_spec.clip_ratio, self.k, self.v, self.pos)
        else:
            if rope is None:
                kv_quant_pack(k, k_spec.clip_ratio, out=self.k, at=self.pos)
            else:
                rope_k_quant_pack(k, *rope, tk, k_spec.clip_ratio, out=self.k, at=self.pos)
            kv_quant_pack(v, v_spec.clip_ratio, out=self.v, at=self.pos)
        self.pos += s
        self.length += s
        return out

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached K and V, (B, Hkv, length, D) in `dtype`: (code − zero)·scale in float32, then cast, as the
        fake quantizer computes them."""
        from flatquant.kernels.kv_cache import kv_dequant

        cut = slice(0, self.length)
        k, v = (kv_dequant(*(t[:, :, cut] for t in cached)).to(dtype) for cached in (self.k, self.v))
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("QuantKVCache is written by flatquant's QuantLayer attention (it quantizes K/V itself); "
                        "a model of unquantized layers generates with DynamicCache")

    def decodes(self, q: torch.Tensor) -> bool:
        """Whether a one-token step attends over the codes (decode_attention's Triton kernel) instead of
        dequantizing them all: where the kernel runs compiled (CUDA with Triton)."""
        from flatquant.kernels.kron_quant import use_triton

        return q.is_cuda and use_triton(q)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, Hq, D), the newest token's query (after RoPE and Tk⁻ᵀ) → attention output (B, Hq, D), over the
        pos[0] tokens written (read on the device)."""
        from flatquant.kernels.kv_cache import decode_attention

        return decode_attention(q, *self.k, *self.v, self.pos.expand(q.shape[0]))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length or -1

    def nbytes(self) -> int:
        """Bytes of the codes, scales and zeros of the tokens written."""
        return sum(t[:, :, : self.length].numel() * t.element_size() for t in (*self.k, *self.v)) if self.k else 0

    def held_bytes(self) -> int:
        """Bytes allocated (capacity, headroom included)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v)) if self.k else 0

    def reset(self) -> None:
        self.k = self.v = self.pos = None
        self.length = self.capacity = 0
        self.is_initialized = False

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("QuantKVCache keeps one length for the whole batch: no cropping, beam search or "
                                  "batch reordering")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = prefetch = _refuse


class QuantKVCache(Cache):
    """A transformers Cache of QuantKVLayers, one per decoder layer, created as the layers first write to it."""

    stores_codes = True  # flatquant.quant_layer.Attention hands it K/V before quantization

    def __init__(self, max_length: int | None = None):
        """max_length: a fixed capacity in tokens (what a CUDA graph of the decode step needs, e.g.
        flatquant.generate.GreedyDecoder); None grows as needed. With a max_length, one-token steps attend over
        the codes even when given an attention mask (transformers builds one while a graph is captured): the
        batch's sequences must be unpadded, which a cache of one length per batch assumes anyway."""
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        super().__init__(layer_class_to_replicate=QuantKVLayer)
        self.max_length = max_length

    def layer(self, layer_idx: int) -> QuantKVLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantKVLayer(self.max_length))
        return self.layers[layer_idx]

    def sync(self) -> None:
        """Set each layer's host-side length from its device position (after CUDA-graph replays); synchronises."""
        for layer in self.layers:
            if layer.pos is not None:
                layer.length = int(layer.pos)

    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros of the cached tokens."""
        return sum(layer.nbytes() for layer in self.layers)

    def held_bytes(self) -> int:
        """Bytes allocated for them (capacity, headroom included)."""
        return sum(layer.held_bytes() for layer in self.layers)
