"""The deployed decoder layer: packed 4-bit weights in linear-group modules, read top to bottom.

Usage:
    qlayer = convert(calib_layer, "rtn")          # flatquant.convert: merge in float64, quantize, pack
    y = qlayer(x, position_embeddings=(cos, sin)) # x: (batch, seq, hidden) → same shape, fake quantization
    qlayer.use_kernels()                          # swap the groups for their Triton twins (real W4A4, GPU)

A QuantLayer holds what FlatQuant keeps online (paper §3.2, Fig. 3) and nothing that trains: the norms with the
diagonal scales folded in, one `LinearGroup` per quantized activation (qkv, o, upgate, down: its online transform,
its activation quantizer and the `QuantWeight` of each linear that reads it), and the attention with its K/V
quantizers and the K transform. Its state_dict is the exported checkpoint's layer (flatquant/export.py).
`use_kernels` is a module swap: each group becomes `QuantLinear.from_group(group)`, the SwiGLU product and the
K/V quantizers their fused twins (flatquant/kernels/); forward does not branch on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatquant.adapters import GROUP_TRANSFORM, GROUPS, LayerParts
from flatquant.quantizers import QuantSpec, Quantizer, dequantize_codes, pack_codes, unpack_codes
from flatquant.rope import apply_rope
from flatquant.spec import QuantConfig
from flatquant.transforms import KronTransform, kron_apply


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers' LlamaRMSNorm computes it (float32 statistics)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def input_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A decoder layer's RMSNorm of x with its float32 weight: on a GPU one kernel (flatquant/kernels/fused.py), not
    seven and a cast; elsewhere ``rms_norm`` with the weight in x's dtype (the same values up to a last bit)."""
    if x.is_cuda:
        from flatquant.kernels.fused import rms_norm as fused_rms_norm

        return fused_rms_norm(x, weight, eps)
    return rms_norm(x, weight.to(x.dtype), eps)


def norm_eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def kernel_unsupported(qcfg: QuantConfig) -> str:
    """Why the W4A4 kernels (flatquant/kernels/) cannot run layers quantized with `qcfg` ('' when they can)."""
    w, a = qcfg.weight_spec(), qcfg.act_spec()
    if (w.bits, w.sym, w.granularity) != (4, True, "channel"):
        return f"the W4A4 kernels take 4-bit symmetric per-channel weights (quant.w_bits=4, w_sym=true, w_group_size=0), not {w}"
    if a.bits != 4:
        return f"the W4A4 kernels take 4-bit activations (quant.a_bits=4), not {a.bits}-bit"
    return ""


class QuantWeight(nn.Module):
    """One linear's weight: integer codes stored by `pack_codes` (4-bit: two per byte) with scale and zero (out,)
    or (out, groups), or a float32 weight where there are no codes (16-bit weights, GPTQ act-order with groups);
    bias (out,) float32 or None. forward dequantizes with the operations quantization used, so the values are the
    ones calibration's fake quantizer produced."""

    def __init__(self, spec: QuantSpec, codes=None, scale=None, zero=None, weight=None, bias=None):
        super().__init__()
        if (codes is None) == (weight is None):
            raise ValueError("a QuantWeight holds either codes (with scale and zero) or a float weight")
        self.spec = spec
        self.register_buffer("codes", codes)
        self.register_buffer("scale", None if scale is None else scale.float().contiguous())
        self.register_buffer("zero", None if zero is None else zero.float().contiguous())
        self.register_buffer("weight", None if weight is None else weight.float())
        self.register_buffer("bias", None if bias is None else bias.float())

    @classmethod
    def from_quantized(cls, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, bias=None):
        """From fake-quantized values w (out, in) and their (scale, zero) (out,) or (out, groups): codes
        round(w/scale) + zero, exact since w = (q − zero)·scale."""
        g = w.view(w.shape[0], scale.shape[1] if scale.dim() == 2 else 1, -1)
        s, z = scale.view(w.shape[0], -1, 1), zero.view(w.shape[0], -1, 1)
        codes = (torch.round(g / s) + z).reshape(w.shape).to(torch.int32)
        return cls(spec, codes=pack_codes(codes, spec), scale=scale, zero=zero, bias=bias)

    @property
    def packed(self) -> bool:
        return self.codes is not None

    @property
    def out_features(self) -> int:
        return (self.codes if self.packed else self.weight).shape[0]

    def int_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (out, in) int32, scale, zero). int32 holds every width QuantConfig accepts."""
        if not self.packed:
            raise ValueError("this weight has no integer codes (not quantized, or GPTQ act-order with groups)")
        return unpack_codes(self.codes, self.spec), self.scale, self.zero

    def dequantized(self) -> torch.Tensor:
        """(out, in) float32: the weight this linear multiplies by."""
        return dequantize_codes(*self.int_codes()) if self.packed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"out={self.out_features}, {'codes ' + str(self.codes.dtype) if self.packed else 'float32'}"


class LinearGroup(nn.Module):
    """The linears that read one quantized activation: online transform → activation quantizer → each linear.

    x: (..., in) → (..., Σ out) in x's dtype, the outputs side by side in GROUPS order (`splits`). online is the
    slot's frozen transform (x·P; its diagonal scale is already in the norm or in up_proj), or for o_proj's input
    the head transform over the head axis, x·(H ⊗ I) (heads=True); None is the identity."""

    def __init__(self, online: KronTransform | None, aq: Quantizer, linears: dict[str, QuantWeight], heads: bool = False,
                 num_heads: int = 0):
        super().__init__()
        self.online, self.aq, self.heads, self.num_heads = online, aq, heads, num_heads
        self.linears = nn.ModuleDict(linears)
        self.splits = [lin.out_features for lin in linears.values()]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.online is None:
            return x
        if self.heads:
            return kron_apply(x, self.online.dense(False), None).to(x.dtype)
        return self.online.apply(x)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """residual: optional (..., Σ out), added to the output (the decoder layer's residual stream); norm: optional
        (weight, eps), the RMSNorm of x (``input_norm``) is what the group reads."""
        if norm is not None:
            x = input_norm(x, *norm)
        x = self.aq(self.transform(x))
        ys = [lin(x) for lin in self.linears.values()]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y if residual is None else residual + y

    # ---- what a kernel twin reads (flatquant.kernels.qlinear.QuantLinear.from_group) --------------------------
    def kernel_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes (Σ out, in) int32, scale (Σ out,) float32, bias (Σ out,) float32 or None)."""
        stored = [lin.int_codes() for lin in self.linears.values()]
        codes = torch.cat([c for c, _, _ in stored])
        scale = torch.cat([s for _, s, _ in stored]).float().view(-1)
        biases = [lin.bias for lin in self.linears.values()]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(n, device=codes.device) if b is None else b for n, b in zip(self.splits, biases)])
        return codes, scale, bias

    def kron_factors(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L, R) of the online transform as the kernel applies it, or None for the identity."""
        if self.heads:
            left = self.online.dense(False) if self.online is not None else torch.eye(self.num_heads)
            return left, torch.eye(in_features // self.num_heads)
        if self.online is not None and self.online.left is not None:
            return self.online.matrices(False)
        return None

    def act_clip(self) -> float:
        clip = self.aq.clip()
        return (1.0 if clip is None else float(clip)) * self.aq.spec.clip_ratio


class SiluMul(nn.Module):
    """SwiGLU's product: y (..., 2I) = [gate | up] → silu(gate)·up (..., I)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up


class Attention(nn.Module):
    """RoPE, the optional q/k norms, the K transform, the K/V cache quantizers and scaled-dot-product attention.

    q: (b, s, heads·hd), k/v: (b, s, kv_heads·hd) → (b, s, heads·hd), before o_proj's head transform. K is
    quantized after RoPE and its transform (K·Tk, Q·Tk⁻ᵀ), V in the basis the v transform merged into v_proj. With
    a cache (a transformers Cache), the quantized K/V of these s tokens are appended to it and the queries attend
    to everything it holds, the s new tokens being the last ones."""

    def __init__(self, parts: LayerParts, kq: Quantizer, vq: Quantizer):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        self.layer_idx = parts.layer_idx
        self.q_norm, self.k_norm = parts.q_norm, parts.k_norm
        self.kq, self.vq = kq, vq

    def forward(self, q, k, v, position_embeddings, attention_mask=None, cache=None, tk: KronTransform | None = None):
        b, s, _ = q.shape
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and self.layer_idx is None:
            raise ValueError("a KV cache needs the layer's index (LayerParts.layer_idx), which this layer lacks")
        codes = getattr(cache, "stores_codes", False)  # flatquant.cache.QuantKVCache: it quantizes K/V itself
        # with the codes, K is written before RoPE: RoPE, ·Tk and the quantizer in one kernel, held in fp32 in between;
        # and a one-token step's queries take RoPE and ·Tk⁻ᵀ in the same launch (the same fp32 sum, rounded once)
        fused_q = codes and s == 1
        if not fused_q:
            cos, sin = (t.unsqueeze(2).to(q.dtype) for t in position_embeddings)

            def rope_t(x, inv_t=False):
                x = apply_rope(x, cos, sin)
                return x if tk is None else tk.apply(x, inv_t=inv_t)

            q = rope_t(q, inv_t=True)
            if not codes:
                k = rope_t(k)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
        if codes:
            layer = cache.layer(self.layer_idx)
            qt = layer.append(k.transpose(1, 2), v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2),
                              self.kq.spec, self.vq.spec, rope=position_embeddings,
                              tk=None if tk is None else tk.dense(), q=q.transpose(1, 2) if fused_q else None,
                              tq=None if tk is None or not fused_q else tk.dense(inv_t=True))
            q = qt if fused_q else q.transpose(1, 2)
            # decode: flash decoding over the codes. A fixed-capacity cache holds unpadded sequences of one length
            # (flatquant.cache), so a mask (transformers builds one while a CUDA graph is captured) adds nothing
            if s == 1 and (mask is None or layer.max_length is not None) and layer.decodes(q):
                return layer.decode(q[:, :, 0]).reshape(b, 1, self.num_heads * self.head_dim)
            k, v = layer.dequantized(q.dtype)
        else:
            k = self.kq(k.reshape(b, s, -1)).view(b, s, self.num_kv_heads, self.head_dim)
            v = self.vq(v).view(b, s, self.num_kv_heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
        causal = mask is None and s > 1
        if causal and k.shape[2] > s:  # new tokens after cached ones: causal from the bottom right, not the top left
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - s)
            causal = False
        # grouped-query attention without copying K/V per query head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)


def kv_quantizers(qcfg: QuantConfig, head_dim: int) -> tuple[Quantizer, Quantizer]:
    return Quantizer(qcfg.kv_spec("k", head_dim)), Quantizer(qcfg.kv_spec("v", head_dim))


class QuantLayer(nn.Module):
    """Drop-in replacement for a transformers decoder layer (forward returns the hidden states).

    Built by flatquant.convert.convert (from a calibrated CalibLayer) or `from_state` (from a checkpoint).
    transforms: the frozen online ones by slot (qkv, upgate, down, heads, k; any may be missing = identity);
    weights: a QuantWeight per linear (q, k, v, o, gate, up, down); norms: (γ₁/d_qkv, γ₂/d_upgate) float32 and
    their eps; aq: the activation quantizer of each group (with its learned LAC clip); attn: the attention with its
    K/V quantizers."""

    def __init__(self, qcfg: QuantConfig, transforms: dict[str, KronTransform], weights: dict[str, QuantWeight],
                 norms: tuple[torch.Tensor, torch.Tensor], eps: tuple[float, float], aq: dict[str, Quantizer],
                 attn: Attention):
        super().__init__()
        self.qcfg = qcfg
        self.eps1, self.eps2 = eps
        self.norm1 = nn.Parameter(norms[0].float(), requires_grad=False)
        self.norm2 = nn.Parameter(norms[1].float(), requires_grad=False)
        for group, names in GROUPS.items():
            slot = GROUP_TRANSFORM[group]
            self.add_module(group, LinearGroup(transforms.get(slot), aq[group], {n: weights[n] for n in names},
                                               heads=slot == "heads", num_heads=attn.num_heads))
        self.attn = attn
        self.k_transform = transforms.get("k")
        self.act = SiluMul()
        self.requires_grad_(False)

    @property
    def layer_idx(self) -> int | None:
        return self.attn.layer_idx

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, past_key_values=None,
                **kwargs):
        """cache (past_key_values in older transformers): a transformers Cache that keeps this layer's quantized K
        (after RoPE and its transform) and V across generation steps; None evaluates the sequence on its own."""
        cache = cache if cache is not None else past_key_values
        # the norms go to the groups that read them, and the residual adds to the linears that end a block: on the
        # kernels (use_kernels) the transform kernels make the norms and the GEMMs add the residuals
        q, k, v = self.qkv(hidden_states, norm=(self.norm1, self.eps1)).split(self.qkv.splits, dim=-1)
        attn = self.attn(q, k, v, position_embeddings, attention_mask, cache, self.k_transform)
        hidden_states = self.o(attn, residual=hidden_states)
        return self.down(self.act(self.upgate(hidden_states, norm=(self.norm2, self.eps2))), residual=hidden_states)

    # ---- inspection --------------------------------------------------------------------------------------------
    def groups(self) -> dict[str, nn.Module]:
        return {g: getattr(self, g) for g in GROUPS}

    @property
    def on_kernels(self) -> bool:
        return not all(isinstance(g, LinearGroup) for g in self.groups().values())

    @property
    def packed(self) -> bool:
        """Every weight kept as integer codes (False on the kernels, which hold their own copy)."""
        return not self.on_kernels and all(w.packed for g in self.groups().values() for w in g.linears.values())

    def quant_weights(self) -> dict[str, QuantWeight]:
        if self.on_kernels:
            raise ValueError("the layer runs on the W4A4 kernels (use_kernels); its weights live in the kernel groups")
        return {n: w for g in self.groups().values() for n, w in g.linears.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """Each linear's (out, in) float32 weight as forward multiplies by it."""
        return {n: w.dequantized() for n, w in self.quant_weights().items()}

    # ---- kernels -----------------------------------------------------------------------------------------------
    def kernel_support(self) -> str:
        """Why the W4A4 kernels cannot run this layer ('' when they can)."""
        if self.on_kernels:
            return ""
        if why := kernel_unsupported(self.qcfg):
            return why
        if not self.packed:
            return "the weights have no integer codes (GPTQ act-order with groups)"
        for group in ("qkv", "upgate", "down"):
            t = getattr(self, group).online
            if t is not None and (t.left is None) != (t.right is None):
                return f"transform {group!r} has one Kronecker factor; the kernel needs both or neither"
        return ""

    @torch.no_grad()
    def use_kernels(self, fuse: bool = True) -> None:
        """Swap the four linear groups for QuantLinear (one fused kernel for the online transform and per-token 4-bit
        quantization, one W4A4 GEMM) and the K/V quantizers for their fused kernels. The groups' codes are re-packed
        into the kernels' layout and the groups dropped (the kernels hold the only copy).

        fuse: qkv's and up/gate's transform kernels also make the RMSNorm in front of them, down_proj's makes SwiGLU's
        product as it reads [gate | up] (QuantLinear's glu), and the residual adds go into the int8 GEMMs' epilogue:
        five kernels a layer fewer in decode, and in prefill neither the norms' outputs nor the product are written
        out. False keeps them kernels of their own (``fused.rms_norm``, ``fused.silu_mul``, an add), the layout
        before, for comparison (flatquant.bench_layer times both)."""
        from flatquant.kernels.fused import FusedSiluMul, GroupFakeQuant
        from flatquant.kernels.qlinear import QuantLinear

        if self.on_kernels:
            return
        if why := self.kernel_support():
            raise ValueError(f"use_kernels: {why}")
        for group in GROUPS:
            twin = QuantLinear.from_group(getattr(self, group), glu=fuse and group == "down")
            twin.fused = fuse
            setattr(self, group, twin)
        self.act = nn.Identity() if fuse else FusedSiluMul()
        self.attn.kq, self.attn.vq = GroupFakeQuant.from_quantizer(self.attn.kq), GroupFakeQuant.from_quantizer(self.attn.vq)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_state(cls, parts: LayerParts, qcfg: QuantConfig, transforms: dict[str, KronTransform | None],
                   state: dict[str, torch.Tensor], device="cpu") -> QuantLayer:
        """The layer whose state_dict was `state` (what export wrote). transforms: the method's transforms for this
        layer (their values are overwritten by the state). They are frozen on `device`, where the layer runs, as
        calibration froze them: float64 on the CPU and on a GPU differ in the last bits, and 1-ulp changes of the
        frozen float32 matrices flip 4-bit activation codes."""
        wspec = qcfg.weight_spec()
        weights = {}
        for group, names in GROUPS.items():
            for n in names:
                key = f"{group}.linears.{n}."
                get = {f: state.get(key + f) for f in ("codes", "scale", "zero", "weight", "bias")}
                weights[n] = QuantWeight(wspec, **get)
        aq = {g: Quantizer(qcfg.act_spec(), qcfg.lac) for g in GROUPS}
        online = {slot: t for slot, t in transforms.items() if t is not None and slot in ONLINE_SLOTS}
        eps = (norm_eps(parts.input_norm), norm_eps(parts.post_norm))
        attn = Attention(parts, *kv_quantizers(qcfg, parts.head_dim))
        layer = cls(qcfg, online, weights, (state["norm1"], state["norm2"]), eps, aq, attn).to(device)
        layer.load_state_dict(state, strict=True)
        for t in online.values():
            t.freeze()
        return layer


ONLINE_SLOTS = (*GROUP_TRANSFORM.values(), "k")  # the transforms a QuantLayer applies at run time
