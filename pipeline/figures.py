"""Figures a run logs: per-layer calibration loss curves, init vs final MSE, and the flatness plot.

The flatness plot (FlatQuant Fig. 1) compares layer 0's q/k/v input and weight, sorted per-channel max
|value|: original, SmoothQuant's scale (α = 0.5), a randomised Hadamard rotation (QuaRot) and the run's own
transform (labelled with its method), all on the same calibration tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flatquant.adapters import adapter_for
from flatquant.quant_layer import QuantLayer, rms_norm
from flatquant.methods import input_absmax, rotation, smooth_scale


def calibration_figures(reports, out_dir: Path) -> list[Path]:
    from analysis.plots import layer_mse_figure, loss_curves_figure, save

    curves = {r.index: r.epoch_losses for r in reports if r.epoch_losses}
    if not curves:
        return []
    init = {r.index: r.init_loss for r in reports if r.epoch_losses}
    final = {r.index: r.final_loss for r in reports if r.epoch_losses}
    return [save(loss_curves_figure(curves, "calibration loss per layer"), out_dir / "loss_curves.png"),
            save(layer_mse_figure(init, final, "layer MSE before and after calibration"), out_dir / "layer_mse.png")]


@torch.no_grad()
def flatness_figure(fp_layer, qlayer: QuantLayer, config, x: torch.Tensor, out_dir: Path, method: str = "flatquant") -> Path:
    """x: (tokens, hidden) float32 input of layer 0; fp_layer the full-precision layer, qlayer its merged version by
    `method`, whose own transform is the curve labelled "<method> (this run)"."""
    from analysis.plots import flatness_plot

    parts = adapter_for(config).parts(fp_layer, config)
    h = rms_norm(x, parts.input_norm.weight.float(), qlayer.eps1)
    w = torch.cat([parts.linears[n].weight.float() for n in ("q", "k", "v")])
    d = smooth_scale(h.abs().amax(0), input_absmax(parts, ("q", "k", "v")), 0.5)
    rot = rotation(h.shape[-1], seed=0).to(h.device)
    t = qlayer.qkv.online
    acts = {"original": h, "smoothquant": h / d, "hadamard": rot.apply(h)}
    weights = {"original": w, "smoothquant": w * d, "hadamard": rot.apply(w, inv_t=True)}
    if t is not None:
        from analysis.tables import PRETTY

        own = f"{PRETTY.get(method, method)} (this run)"
        acts[own] = qlayer.qkv.transform(rms_norm(x, qlayer.norm1, qlayer.eps1))
        w = qlayer.weights()
        weights[own] = torch.cat([w["q"], w["k"], w["v"]])
    return flatness_plot(acts, weights, out_dir, title="layer 0 q/k/v input: flatness")
