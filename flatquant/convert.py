"""convert: a calibrated CalibLayer → the deployed QuantLayer (merge, quantize the weights, pack).

Usage:
    qlayer = convert(calib_layer, "rtn")                                   # RTN with the learned LWC clips
    qlayer = convert(calib_layer, "gptq", batches=inputs, position_embeddings=pe, gptq=GPTQOptions())

The transform algebra runs in float64 (as the reference does) so merging adds no error of its own: each linear's
weight becomes W·diag(d)·P⁻ᵀ (and the V / head transforms on its outputs), the diagonal scales fold into the norms
and up_proj, and the online transforms are copied and frozen. Then each weight is quantized once — RTN with its
learned clip, or GPTQ on the Hessians of the merged layer's real linear inputs (transformed and quantized), taken
by forward pre-hooks while `batches` run through it — and kept as integer codes with scale and zero. The
CalibLayer is left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flatquant.adapters import GROUPS, INPUT_GROUP
from flatquant.gptq import HessianAccumulator, gptq_quantize, rtn_fit_qdq
from flatquant.layer import CalibLayer
from flatquant.quant_layer import ONLINE_SLOTS, QuantLayer, QuantWeight
from flatquant.quantizers import quantize

WEIGHT_QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False


@torch.no_grad()
def convert(calib: CalibLayer, weights: str = "rtn", batches: Iterable[torch.Tensor] = (), position_embeddings=None,
            gptq: GPTQOptions = GPTQOptions()) -> QuantLayer:
    """The QuantLayer of `calib` with its weights quantized by `weights` (rtn | gptq). GPTQ needs the layer's
    inputs: `batches` of (batch, seq, hidden) on the layer's device, with their `position_embeddings`."""
    if weights not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weights must be one of {WEIGHT_QUANTIZERS}, got {weights!r}")
    spec = calib.qcfg.weight_spec()
    merged = {n: calib.transformed_weight(n, torch.float64).float() for n in calib.wq}
    biases = {n: None if (b := calib.bias(n, torch.float64)) is None else b.float() for n in calib.wq}
    if spec.enabled and weights == "rtn":
        qweights = {n: _rtn(calib, n, w, biases[n]) for n, w in merged.items()}
    else:
        qweights = {n: QuantWeight(spec, weight=w, bias=biases[n]) for n, w in merged.items()}
    norms = (calib.norm_weight("qkv", torch.float64).float(), calib.norm_weight("upgate", torch.float64).float())
    online = {slot: copy.deepcopy(calib.t(slot)) for slot in ONLINE_SLOTS if calib.t(slot) is not None}
    for t in online.values():
        t.freeze()
    aq = {g: copy.deepcopy(calib.aq[g]) for g in GROUPS}
    qlayer = QuantLayer(calib.qcfg, online, qweights, norms, (calib.eps1, calib.eps2), aq, copy.deepcopy(calib.attn))
    if spec.enabled and weights == "gptq":
        _gptq(calib, qlayer, merged, biases, batches, position_embeddings, gptq)
    return qlayer


def _rtn(calib: CalibLayer, name: str, w: torch.Tensor, bias) -> QuantWeight:
    """RTN with the learned LWC clip."""
    spec = calib.qcfg.weight_spec()
    q, scale, zero = quantize(w, spec, calib.wq[name].grouped_clip())
    return QuantWeight.from_quantized(((q - zero) * scale).reshape(w.shape), scale.squeeze(-1), zero.squeeze(-1), spec, bias)


def hessians(qlayer: QuantLayer, batches: Iterable[torch.Tensor], position_embeddings) -> dict[str, torch.Tensor]:
    """Group → the Hessian 2·XᵀX/n of its linears' input (after the online transform and the activation quantizer),
    from forward pre-hooks on the first linear of each group while `batches` run through the layer."""
    acc: dict[str, HessianAccumulator] = {}

    def observe(group):
        def hook(module, args):
            x = args[0]
            acc.setdefault(group, HessianAccumulator(x.shape[-1], x.device)).add_batch(x)
        return hook

    handles = [next(iter(getattr(qlayer, g).linears.values())).register_forward_pre_hook(observe(g)) for g in GROUPS]
    try:
        for x in batches:
            qlayer(x, position_embeddings=position_embeddings)
    finally:
        for h in handles:
            h.remove()
    if set(acc) != set(GROUPS):
        raise ValueError("GPTQ needs the layer's calibration inputs (batches), none were given")
    return {g: a.hessian for g, a in acc.items()}


def _gptq(calib, qlayer, merged, biases, batches, position_embeddings, opts: GPTQOptions) -> None:
    """Quantize the merged floating-point weights with GPTQ, keeping each row's learned LWC clip."""
    spec = calib.qcfg.weight_spec()
    h = hessians(qlayer, batches, position_embeddings)
    for n, quantizer in calib.wq.items():
        clip = quantizer.clip()
        fit, qdq = rtn_fit_qdq(spec.bits, spec.sym, None if clip is None else clip.squeeze(1))
        fitted = []

        def record(w, fit=fit, fitted=fitted):  # keep each fit's (scale, zero) for the codes
            fitted.append(fit(w))
            return fitted[-1]

        w = gptq_quantize(merged[n], h[INPUT_GROUP[n]], record, qdq, blocksize=opts.blocksize, percdamp=opts.percdamp,
                          act_order=opts.act_order, group_size=spec.group_size or None)
        if opts.act_order and spec.group_size:  # permuted groups have no (out, groups) layout: kept as float values
            new = QuantWeight(spec, weight=w, bias=biases[n])
        else:
            scale, zero = (torch.stack(v, dim=1) for v in zip(*fitted))
            if len(fitted) == 1:
                scale, zero = scale.squeeze(1), zero.squeeze(1)
            new = QuantWeight.from_quantized(w, scale, zero, spec, biases[n])
        getattr(qlayer, INPUT_GROUP[n]).linears[n] = new.to(w.device)
