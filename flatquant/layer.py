"""The calibration layer: a LLaMA-style decoder layer with learnable transforms and fake quantizers at every linear.

Usage:
    layer = CalibLayer(parts, qcfg, transforms)         # parts from an adapter, transforms from a method
    y = layer(x, position_embeddings=(cos, sin))        # x: (batch, seq, hidden) → same shape
    qlayer = convert(layer, "rtn")                      # flatquant.convert → the deployed QuantLayer

This is what calibration trains (flatquant/calibrate.py) and saves: the transforms, the weight quantizers with
their LWC clips and the activation quantizers with their LAC clips. Each forward computes every effective weight
from the live parameters (W·diag(d)·P⁻ᵀ, then LWC quantization), and the per-channel scales d divide the norm
weights (γ/d) and up_proj's rows on the fly; `convert` folds all of that into stored weights once, in float64,
leaving online only what FlatQuant keeps online (paper §3.2, Fig. 3): x·P before each quantizer, the head
transform before o_proj and the K transform after RoPE.

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

from flatquant.adapters import GROUPS, LINEAR_INPUT, SLOTS, LayerParts
from flatquant.quant_layer import Attention, kv_quantizers, norm_eps, rms_norm
from flatquant.quantizers import Quantizer
from flatquant.spec import QuantConfig
from flatquant.transforms import KronTransform, cached_matrices, kron_apply


class CalibLayer(nn.Module):
    """A decoder layer whose transforms and clips train (forward returns the hidden states)."""

    def __init__(self, parts: LayerParts, qcfg: QuantConfig, transforms: dict[str, KronTransform | None]):
        super().__init__()
        unknown = set(transforms) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown transform slots {sorted(unknown)}; known: {SLOTS}")
        self.num_heads, self.num_kv_heads, self.head_dim = parts.num_heads, parts.num_kv_heads, parts.head_dim
        self.eps1, self.eps2 = norm_eps(parts.input_norm), norm_eps(parts.post_norm)
        self.qcfg = qcfg
        self.norm1 = nn.Parameter(parts.input_norm.weight.detach().float().clone(), requires_grad=False)
        self.norm2 = nn.Parameter(parts.post_norm.weight.detach().float().clone(), requires_grad=False)
        for name, lin in parts.linears.items():
            self.register_buffer(f"w_{name}", lin.weight.detach().float().clone())
            bias = None if lin.bias is None else lin.bias.detach().float().clone()
            self.register_buffer(f"b_{name}", bias)
        self.transforms = nn.ModuleDict({k: v for k, v in transforms.items() if v is not None})
        wspec, aspec = qcfg.weight_spec(), qcfg.act_spec()
        self.wq = nn.ModuleDict(
            {n: Quantizer(wspec, qcfg.lwc, rows=lin.weight.shape[0]) for n, lin in parts.linears.items()}
        )
        self.aq = nn.ModuleDict({g: Quantizer(aspec, qcfg.lac) for g in GROUPS})
        self.attn = Attention(parts, *kv_quantizers(qcfg, self.head_dim))

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
        if b is None:
            return b
        if name == "v" and self.t("v") is not None:
            return self._out_transform(b.to(dtype).unsqueeze(1), self.t("v")).squeeze(1)
        if name == "up" and self.t("down") is not None and self.t("down").diag is not None:
            return b.to(dtype) / self.t("down").diag.to(dtype)  # (x·Wᵀ + b)/d: the down scale divides the bias too
        return b.to(dtype)

    def weights(self) -> dict[str, torch.Tensor]:
        """Each linear's effective weight, fake-quantized with its LWC clip (what forward multiplies by)."""
        return {n: self.wq[n](self.transformed_weight(n)) for n in self.wq}

    # ---- forward -----------------------------------------------------------------------------------
    def norm_weight(self, slot: str, dtype=torch.float32) -> torch.Tensor:
        """γ/d: the slot's diagonal scale divides the activation through the norm's weight."""
        norm = self.norm1 if slot == "qkv" else self.norm2
        t = self.t(slot)
        if t is None or t.diag is None:
            return norm.to(dtype)
        return norm.to(dtype) / t.diag.to(dtype)

    def online(self, group: str, x: torch.Tensor) -> torch.Tensor:
        """x·P for the group's transform (the diagonal scale is already in the norm or up_proj); for o_proj's
        input the head transform, x·(H ⊗ I)."""
        if group == "o":
            th = self.t("heads")
            return x if th is None else kron_apply(x, th.dense(False), None).to(x.dtype)
        t = self.t(group)
        return x if t is None else t.apply(x)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        with cached_matrices(self.transforms.values()):
            w = self.weights()
            bias = {n: self.bias(n) for n in self.wq}
            dtype = hidden_states.dtype

            def group(name, x):
                """Online transform, activation quantizer and the linears that read the result."""
                x = self.aq[name](self.online(name, x))
                return [F.linear(x, w[n].to(dtype), None if bias[n] is None else bias[n].to(dtype)) for n in GROUPS[name]]

            h = rms_norm(hidden_states, self.norm_weight("qkv", dtype), self.eps1)
            attn = self.attn(*group("qkv", h), position_embeddings, attention_mask, None, self.t("k"))
            hidden_states = hidden_states + group("o", attn)[0]
            h = rms_norm(hidden_states, self.norm_weight("upgate", dtype), self.eps2)
            gate, up = group("upgate", h)
            return hidden_states + group("down", F.silu(gate) * up)[0]
