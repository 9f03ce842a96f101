"""A LLaMA-style decoder layer with affine transforms and fake quantizers at every linear.

Usage:
    layer = QuantDecoderLayer(parts, qcfg, transforms)   # parts from an adapter, transforms from a method
    y = layer(x, position_embeddings=(cos, sin))          # x: (batch, seq, hidden) → same shape
    layer.merge()                                         # fold transforms into weights (float64), freeze
    layer.pack()                                          # keep quantized weights as 4-bit codes (same outputs)
    layer.use_kernels()                                   # run the linears on the Triton W4A4 kernels (GPU)

One forward serves calibration and evaluation. Before merge() each effective weight is computed from
the live parameters (W·diag(d)·P⁻ᵀ, then LWC quantization) and the per-channel scales d divide the
norm weights (γ/d) and up_proj's rows on the fly; after merge() both are stored, as are the quantized weights,
so the only online work left is what FlatQuant keeps online: x·P before each quantizer, the head
transform before o_proj and the K transform after RoPE (paper §3.2, Fig. 3).

Transform slots (any may be None = identity):
    qkv    (hidden)         after input_layernorm, shared by q/k/v          diag folded into the norm
    upgate (hidden)         after post_attention_layernorm, shared by up/gate  diag folded into the norm
    down   (intermediate)   before down_proj                                diag folded into up_proj rows
    heads  (num_heads)      over the head axis before o_proj (online)
    v      (head_dim)       V-cache transform, merged into v_proj rows and o_proj columns
    k      (head_dim)       K-cache transform after RoPE: K·Tk, Q·Tk⁻ᵀ (online)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatquant.adapters import GROUP_LEADER, GROUPS, INPUT_GROUP, LINEAR_INPUT, SLOTS, LayerParts
from flatquant.gptq import HessianAccumulator, gptq_quantize, rtn_fit_qdq
from flatquant.quantizers import Quantizer, dequantize_codes, pack_codes, quantize, unpack_codes
from flatquant.rope import rotate_half
from flatquant.spec import QuantConfig
from flatquant.transforms import KronTransform, cached_matrices, kron_apply


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers' LlamaRMSNorm computes it (float32 statistics)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _norm_eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def kernel_unsupported(qcfg: QuantConfig) -> str:
    """Why the W4A4 kernels (flatquant/kernels/) cannot run layers quantized with `qcfg` ('' when they can)."""
    w, a = qcfg.weight_spec(), qcfg.act_spec()
    if (w.bits, w.sym, w.granularity) != (4, True, "channel"):
        return f"the W4A4 kernels take 4-bit symmetric per-channel weights (quant.w_bits=4, w_sym=true, w_group_size=0), not {w}"
    if a.bits != 4:
        return f"the W4A4 kernels take 4-bit activations (quant.a_bits=4), not {a.bits}-bit"
    return ""


class QuantDecoderLayer(nn.Module):
    """Drop-in replacement for a transformers decoder layer (forward returns the hidden states)."""

    def __init__(self, parts: LayerParts, qcfg: QuantConfig, transforms: dict[str, KronTransform | None]):
        super().__init__()
        unknown = set(transforms) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown transform slots {sorted(unknown)}; known: {SLOTS}")
        self.num_heads, self.num_kv_heads, self.head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        self.layer_idx = parts.layer_idx  # where this layer's K/V go in a transformers Cache (generation)
        self.eps1, self.eps2 = _norm_eps(parts.input_norm), _norm_eps(parts.post_norm)
        self.qcfg = qcfg
        self.merged = False
        self.packed = False  # pack(): weights kept as integer codes (4-bit: two per byte) plus scale/zero
        self.kernels: nn.ModuleDict | None = None  # use_kernels(): one QuantLinear per input group (real W4A4)
        self.observers: dict[str, object] | None = None  # input group → HessianAccumulator, for GPTQ
        self.weight_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (scale, zero) after merge
        self.norm1 = nn.Parameter(parts.input_norm.weight.detach().float().clone(), requires_grad=False)
        self.norm2 = nn.Parameter(parts.post_norm.weight.detach().float().clone(), requires_grad=False)
        self.q_norm, self.k_norm = parts.q_norm, parts.k_norm
        self.out_features = {n: lin.weight.shape[0] for n, lin in parts.linears.items()}
        for name, lin in parts.linears.items():
            self.register_buffer(f"w_{name}", lin.weight.detach().float().clone())
            bias = None if lin.bias is None else lin.bias.detach().float().clone()
            self.register_buffer(f"b_{name}", bias)
        self.transforms = nn.ModuleDict({k: v for k, v in transforms.items() if v is not None})
        wspec, aspec = qcfg.weight_spec(), qcfg.act_spec()
        self.wq = nn.ModuleDict(
            {n: Quantizer(wspec, qcfg.lwc, rows=lin.weight.shape[0]) for n, lin in parts.linears.items()}
        )
        self.aq = nn.ModuleDict({n: Quantizer(aspec, qcfg.lac) for n in ("qkv", "upgate", "down", "o")})
        self.kq = Quantizer(qcfg.kv_spec("k", self.head_dim))
        self.vq = Quantizer(qcfg.kv_spec("v", self.head_dim))

    def t(self, slot: str) -> KronTransform | None:
        return self.transforms[slot] if slot in self.transforms else None

    # ---- effective weights -------------------------------------------------------------------------
    def transformed_weight(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """W̃ for one linear before weight quantization: inputs and outputs carried into the transformed bases."""
        w = getattr(self, f"w_{name}").to(dtype)
        slot = LINEAR_INPUT.get(name)
        if slot and self.t(slot) is not None:
            w = self.t(slot).weight(w)
        if name == "v" and self.t("v") is not None:
            w = self._out_transform(w, self.t("v"))
        if name == "o":
            w = self._o_weight(w)
        if name == "up" and self.t("down") is not None and self.t("down").diag is not None:
            w = w / self.t("down").diag.to(dtype).unsqueeze(1)
        return w

    def _out_transform(self, w: torch.Tensor, tv: KronTransform) -> torch.Tensor:
        """Rows of v_proj per KV head: W_h ↦ Tvᵀ·W_h, so v_proj emits V·Tv."""
        wt = w.t().reshape(w.shape[1], self.num_kv_heads, self.head_dim)
        return tv.apply(wt).reshape(w.shape[1], -1).t()

    def _o_weight(self, w: torch.Tensor) -> torch.Tensor:
        """o_proj columns: W_o·(H ⊗ Tv)⁻ᵀ, matching the head transform and the merged V transform."""
        th, tv = self.t("heads"), self.t("v")
        if th is None and tv is None:
            return w
        dtype = torch.float64 if w.dtype == torch.float64 else None
        left = th.dense(True, dtype) if th is not None else None
        right = tv.dense(True, dtype) if tv is not None else None
        return kron_apply(w, left, right)

    def bias(self, name: str, dtype=torch.float32) -> torch.Tensor | None:
        b = getattr(self, f"b_{name}")
        if b is None or self.merged:
            return b
        if name == "v" and self.t("v") is not None:
            return self._out_transform(b.to(dtype).unsqueeze(1), self.t("v")).squeeze(1)
        if name == "up" and self.t("down") is not None and self.t("down").diag is not None:
            return b.to(dtype) / self.t("down").diag.to(dtype)  # (x·Wᵀ + b)/d: the down scale divides the bias too
        return b.to(dtype)

    def weights(self) -> dict[str, torch.Tensor]:
        if self.packed:
            return {n: self._dequant(n) for n in self.wq}
        if self.merged:
            return {n: getattr(self, f"w_{n}") for n in self.wq}
        return {n: self.wq[n](self.transformed_weight(n)) for n in self.wq}

    # ---- forward -----------------------------------------------------------------------------------
    def norm_weight(self, slot: str, dtype=torch.float32) -> torch.Tensor:
        """γ/d: the slot's diagonal scale divides the activation through the norm's weight."""
        norm = self.norm1 if slot == "qkv" else self.norm2
        t = self.t(slot)
        if self.merged or t is None or t.diag is None:
            return norm.to(dtype)
        return norm.to(dtype) / t.diag.to(dtype)

    def _online(self, slot: str, x: torch.Tensor) -> torch.Tensor:
        """x·P for the slot's transform (the diagonal scale is already in the norm or up_proj); for o_proj's
        input the head transform, x·(H ⊗ I)."""
        if slot == "o":
            th = self.t("heads")
            return x if th is None else kron_apply(x, th.dense(False), None).to(x.dtype)
        t = self.t(slot)
        return x if t is None else t.apply(x)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, past_key_values=None,
                **kwargs):
        """cache (past_key_values in older transformers): a transformers Cache that keeps this layer's quantized K
        (after RoPE and its transform) and V across generation steps; None evaluates the sequence on its own."""
        cache = cache if cache is not None else past_key_values
        with cached_matrices(self.transforms.values(), enabled=not self.merged):
            fake = self.kernels is None
            w = self.weights() if fake else None
            bias = {n: self.bias(n) for n in self.wq} if fake else None
            dtype = hidden_states.dtype

            def lin(x, n):
                if self.observers is not None and n in GROUP_LEADER:
                    self.observers.setdefault(INPUT_GROUP[n], HessianAccumulator(x.shape[-1], x.device)).add_batch(x)
                return F.linear(x, w[n].to(dtype), None if bias[n] is None else bias[n].to(dtype))

            def group(slot, x):
                """Online transform, activation quantizer and the linears that read the result."""
                if not fake:
                    return self.kernels[slot](x).split([self.out_features[n] for n in GROUPS[slot]], dim=-1)
                x = self.aq[slot](self._online(slot, x))
                return [lin(x, n) for n in GROUPS[slot]]

            h = rms_norm(hidden_states, self.norm_weight("qkv", dtype), self.eps1)
            attn = self._attention(*group("qkv", h), position_embeddings, attention_mask, cache)
            hidden_states = hidden_states + group("o", attn)[0]
            h = rms_norm(hidden_states, self.norm_weight("upgate", dtype), self.eps2)
            if fake:
                gate, up = group("upgate", h)
                m = F.silu(gate) * up
            else:  # one pass over the [gate | up] GEMM output
                from flatquant.kernels.fused import silu_mul

                y = self.kernels["upgate"](h)
                m = silu_mul(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], -1)
            return hidden_states + group("down", m)[0]

    def _attention(self, q, k, v, position_embeddings, attention_mask, cache=None):
        """q: (b, s, heads·hd), k/v: (b, s, kv_heads·hd) → attention output (b, s, heads·hd), before o_proj's
        head transform and quantizer. With a cache, the quantized K/V of these s tokens are appended to it and the
        queries attend to everything it holds (the s new tokens being the last ones)."""
        b, s, _ = q.shape
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.unsqueeze(2).to(q.dtype) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.t("k") is not None:
            q, k = self.t("k").apply(q, inv_t=True), self.t("k").apply(k)
        k = self._kv_quant(self.kq, k.reshape(b, s, -1)).view(b, s, self.num_kv_heads, self.head_dim)
        v = self._kv_quant(self.vq, v).view(b, s, self.num_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if self.layer_idx is None:
                raise ValueError("a KV cache needs the layer's index (LayerParts.layer_idx), which this layer lacks")
            k, v = cache.update(k, v, self.layer_idx)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
        causal = mask is None and s > 1
        if causal and k.shape[2] > s:  # new tokens after cached ones: causal from the bottom right, not the top left
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - s)
            causal = False
        # grouped-query attention without copying K/V per query head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)

    def _kv_quant(self, quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
        """The K/V cache quantizer; on the kernels, one fused pass with the same values (flatquant/kernels/fused.py)."""
        spec = quantizer.spec
        if self.kernels is None or not spec.enabled or quantizer.clip_logit is not None:
            return quantizer(x)
        from flatquant.kernels.fused import group_fake_quant

        return group_fake_quant(x, spec.group_size, spec.bits, spec.sym, spec.clip_ratio)

    # ---- merge -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, quantize_weights: bool = True) -> None:
        """Fold the diagonal scales and the weight-side transforms into stored, quantized weights.

        The transform algebra runs in float64 (as the reference does) so merging adds no error of its
        own; weights are then fake-quantized once with their learned LWC clip (RTN) and stored in
        float32. quantize_weights=False keeps them in floating point for `gptq_weights`.
        """
        if self.merged:
            return
        new = {n: self.transformed_weight(n, torch.float64).float() for n in self.wq}
        if quantize_weights:
            new = {n: self._rtn(n, w) for n, w in new.items()}
        new_bias = {n: self.bias(n, torch.float64) for n in self.wq}
        self.norm1.data = self.norm_weight("qkv", torch.float64).float()
        self.norm2.data = self.norm_weight("upgate", torch.float64).float()
        for n in self.wq:
            setattr(self, f"w_{n}", new[n])
            if new_bias[n] is not None:
                setattr(self, f"b_{n}", new_bias[n].float())
        for t in self.transforms.values():
            t.freeze()
        self.merged = True
        self.requires_grad_(False)

    @torch.no_grad()
    def load_merged(self, state: dict[str, torch.Tensor]) -> None:
        """Become the merged layer whose state_dict was `state` (what export wrote, weights dequantized)."""
        for key, value in state.items():
            if key.startswith(("w_", "b_")):
                setattr(self, key, value.float())
        self.load_state_dict(state, strict=True)
        for t in self.transforms.values():
            t.freeze()
        self.merged = True
        self.requires_grad_(False)

    def _rtn(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """RTN with the learned LWC clip; records (scale, zero) so that export can write the integer codes."""
        spec = self.qcfg.weight_spec()
        if not spec.enabled:
            return w
        q, scale, zero = quantize(w, spec, self.wq[name].grouped_clip())
        self.weight_qparams[name] = (scale.squeeze(-1), zero.squeeze(-1))
        return ((q - zero) * scale).reshape(w.shape)

    def weight_codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (out, in) int32 of a merged quantized weight, with scale and zero (out,) or (out, groups).
        int32 holds every width QuantConfig accepts (8-bit asymmetric and 9..15-bit codes overflow int8)."""
        if self.kernels is not None:
            raise ValueError("the layer runs on the W4A4 kernels (use_kernels); its codes live in self.kernels")
        if self.packed:
            codes = unpack_codes(getattr(self, f"c_{name}"), self.qcfg.weight_spec())
            return codes, getattr(self, f"s_{name}"), getattr(self, f"z_{name}")
        if name not in self.weight_qparams:
            raise ValueError(f"weight {name!r} has no recorded quantization parameters (not quantized, or GPTQ act-order with groups)")
        scale, zero = self.weight_qparams[name]
        w = getattr(self, f"w_{name}")
        g = w.view(w.shape[0], scale.shape[1] if scale.dim() == 2 else 1, -1)
        s, z = scale.view(w.shape[0], -1, 1), zero.view(w.shape[0], -1, 1)
        return (torch.round(g / s) + z).reshape(w.shape).to(torch.int32), scale, zero

    # ---- compact storage and the real 4-bit path ---------------------------------------------------
    @torch.no_grad()
    def pack(self) -> bool:
        """Keep each quantized weight only as its integer codes (two 4-bit codes per byte, wider ones unpacked in
        the narrowest integer dtype that holds them, see pack_codes) with scale and zero: 1/8 of the float32
        storage at 4 bits. forward dequantizes them to exactly the values merge() stored.
        Returns False (and changes nothing) when the weights are not quantized or have no code layout."""
        spec = self.qcfg.weight_spec()
        if self.packed:
            return True
        if not self.merged or not spec.enabled or any(n not in self.weight_qparams for n in self.wq):
            return False
        for n in self.wq:
            codes, scale, zero = self.weight_codes(n)
            setattr(self, f"w_{n}", None)
            self.register_buffer(f"c_{n}", pack_codes(codes, spec))
            self.register_buffer(f"s_{n}", scale.float().contiguous())
            self.register_buffer(f"z_{n}", zero.float().contiguous())
        self.weight_qparams = {}
        self.packed = True
        return True

    def _dequant(self, name: str) -> torch.Tensor:
        """(q − zero)·scale in float32, the same operations `_rtn` used, so the values are identical."""
        return dequantize_codes(*self.weight_codes(name))

    def kernel_support(self) -> str:
        """Why the W4A4 kernels cannot run this layer ('' when they can)."""
        if not self.merged:
            return "the layer is not merged"
        if why := kernel_unsupported(self.qcfg):
            return why
        if any(n not in self.weight_qparams for n in self.wq) and not self.packed:
            return "the weights have no integer codes (GPTQ act-order with groups)"
        for slot, t in self.transforms.items():
            if slot in ("qkv", "upgate", "down") and (t.left is None) != (t.right is None):
                return f"transform {slot!r} has one Kronecker factor; the kernel needs both or neither"
        return ""

    @torch.no_grad()
    def use_kernels(self) -> None:
        """Run the four linear groups (qkv, o, up+gate, down) as QuantLinear: one fused kernel for the online
        transform and per-token 4-bit quantization, one W4A4 GEMM (flatquant/kernels/). The float and packed weights are
        dropped (the kernels hold the only copy). Attention and the K/V quantizers stay in PyTorch."""
        from flatquant.kernels.qlinear import QuantLinear
        from flatquant.packing import kron_dims, pack_int4_twos as pack_signed

        why = self.kernel_support()
        if why:
            raise ValueError(f"use_kernels: {why}")
        spec = self.qcfg.act_spec()
        modules = {}
        for slot, names in GROUPS.items():
            stored = [self.weight_codes(n) for n in names]  # unpacks each weight once
            codes = torch.cat([c for c, _, _ in stored])
            scale = torch.cat([sc for _, sc, _ in stored]).float()
            biases = [getattr(self, f"b_{n}") for n in names]
            bias = None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(self.out_features[n], device=codes.device) if b is None else b.float() for n, b in zip(names, biases)])
            if slot == "o":
                th = self.t("heads")
                L = th.dense(False) if th is not None else torch.eye(self.num_heads)
                R = torch.eye(self.head_dim)
            elif self.t(slot) is not None and self.t(slot).left is not None:
                L, R = self.t(slot).matrices(False)
            else:
                L, R = (torch.eye(k) for k in kron_dims(codes.shape[1], allow_prime=True))
            clip = self.aq[slot].clip()
            act_clip = (1.0 if clip is None else float(clip)) * spec.clip_ratio
            layer = QuantLinear(codes.shape[1], codes.shape[0], act_clip, spec.sym, L.shape[0], True, bias is not None)
            layer.qweight.copy_(pack_signed(codes))
            layer.wscale.copy_(scale.view(-1))
            layer.wsum.copy_(codes.sum(dim=1, dtype=torch.int32))
            layer.L.copy_(L.float())
            layer.R.copy_(R.float())
            if bias is not None:
                layer.bias.copy_(bias)
            modules[slot] = layer.to(codes.device)
        for n in self.wq:
            for prefix in ("w_", "c_", "s_", "z_"):
                if hasattr(self, prefix + n):
                    setattr(self, prefix + n, None)
        self.weight_qparams = {}
        self.kernels = nn.ModuleDict(modules)

    @torch.no_grad()
    def gptq_weights(self, hessians: dict, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False) -> None:
        """Quantize the merged floating-point weights with GPTQ, on the Hessians of the layer's real
        (transformed, quantized) linear inputs, keeping each row's learned LWC clip."""
        spec = self.qcfg.weight_spec()
        if not self.merged or not spec.enabled:
            return
        for n, quantizer in self.wq.items():
            clip = quantizer.clip()
            fit, qdq = rtn_fit_qdq(spec.bits, spec.sym, None if clip is None else clip.squeeze(1))
            fitted = []

            def record(w, fit=fit, fitted=fitted):  # keep each fit's (scale, zero) for export
                fitted.append(fit(w))
                return fitted[-1]

            w = gptq_quantize(getattr(self, f"w_{n}"), hessians[INPUT_GROUP[n]].hessian, record, qdq, blocksize=blocksize,
                              percdamp=percdamp, act_order=act_order, group_size=spec.group_size or None)
            setattr(self, f"w_{n}", w)
            if not (act_order and spec.group_size):  # permuted groups have no (out, groups) layout
                scale, zero = (torch.stack(v, dim=1) for v in zip(*fitted))
                self.weight_qparams[n] = (scale.squeeze(1), zero.squeeze(1)) if len(fitted) == 1 else (scale, zero)
