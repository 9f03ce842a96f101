"""GPTQ weight quantization (Frantar et al. 2022, arXiv 2210.17323), independent of the weight format.

Usage::

    acc = HessianAccumulator(layer.in_features, device)
    for x in calibration_inputs:                    # x: (..., in_features) activations of `layer`
        acc.add_batch(x)
    fit, qdq = rtn_fit_qdq(bits=4, sym=True)
    w_dq = gptq_quantize(layer.weight, acc.hessian, fit, qdq, group_size=128)

Why: FlatQuant (arXiv 2410.09426) reports W4A4 results with either RTN or GPTQ weights; the
transforms only change the weight and the Hessian, so GPTQ takes the quantizer as two functions
(like gpt-fast's GPTQ runner) and works for any grid: `fit` computes parameters from a weight
slice, `qdq` quantizes-dequantizes one column with them. The algorithm follows the reference
`fasterquant`: dead-column handling, optional act-order, 1% damping, the upper Cholesky factor
of H⁻¹, and lazy batch updates over blocks of 128 columns.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

FitFn = Callable[[torch.Tensor], Any]
QdqFn = Callable[[torch.Tensor, Any], torch.Tensor]


class HessianAccumulator:
    """Running H = 2/N Σ x xᵀ over all N calibration rows: (in_features, in_features) float32.

    Kept as a running mean (H ← H·n/(n+t) + 2/(n+t)·Σ_batch x xᵀ) like the reference, so the
    entries stay O(‖x‖²) however many batches arrive. N counts rows (tokens), not sequences as in
    the reference; GPTQ's result does not depend on H's scale because damping is relative.
    """

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations x: (..., in_features) any float dtype; upcast to float32 before the product."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features).to(device=self._h.device, dtype=torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        self._h.mul_(self.nsamples / (self.nsamples + t))
        self.nsamples += t
        self._h.addmm_(x.t(), x, alpha=2.0 / self.nsamples)

    @property
    def hessian(self) -> torch.Tensor:
        """H: (in_features, in_features) float32, the accumulated proxy Hessian 2/N XᵀX."""
        return self._h


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ = Uᵀ U with λ = percdamp · mean(diag H): (in, in).

    Row i of U, divided by U[i, i], is the update direction that spreads column i's quantization
    error over the columns not yet quantized (GPTQ eq. 3 after the Cholesky reformulation).
    """
    h = h.clone()
    h.diagonal().add_(percdamp * torch.mean(torch.diagonal(h)))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _group_columns(
    w: torch.Tensor, err: torch.Tensor, hinv: torch.Tensor, start: int, i1: int, i2: int, group_size: int
) -> torch.Tensor:
    """Current (fully updated) values of columns start : start + group_size: (out, g) float.

    Columns inside the active block [i1, i2) are already updated in place; columns past i2 still
    lack the lazy update from this block's first (start − i1) columns, which is added here so the
    fit sees the same weights the columns will be quantized from.
    """
    end = min(start + group_size, w.shape[1])
    cols = w[:, start:end].clone()
    if end > i2 and start > i1:
        done = slice(i1, start)
        cols[:, i2 - start:] -= err[:, : start - i1] @ hinv[done, i2:end]
    return cols


def _quantize_block(
    w: torch.Tensor, q: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int,
    fit: FitFn, qdq: QdqFn, params: Any, group_size: int | None,
) -> Any:
    """Quantize columns [i1, i2) of w into q and push their error onto the later columns.

    w, q: (out, in) float32, updated in place; hinv: (in, in) upper factor of H⁻¹. Inside the block
    every column's error is applied at once (rank-1, cheap on a 128-wide slice); the columns past
    the block get one matmul at the end, the "lazy batch" update of GPTQ §3. Returns the current
    quantization parameters, refit at each group start when group_size is set.
    """
    w1 = w[:, i1:i2]  # a view: in-block updates land in w directly
    hinv1 = hinv[i1:i2, i1:i2]
    err = torch.zeros_like(w1)
    for i in range(i2 - i1):
        col = i1 + i
        if group_size is not None and col % group_size == 0:
            params = fit(_group_columns(w, err, hinv, col, i1, i2, group_size))
        q[:, col] = qdq(w1[:, i], params)
        err[:, i] = (w1[:, i] - q[:, col]) / hinv1[i, i]
        w1[:, i:] -= err[:, i:i + 1] @ hinv1[i:i + 1, i:]
    w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return params


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fit: FitFn,
    qdq: QdqFn,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    group_size: int | None = None,
) -> torch.Tensor:
    """GPTQ-quantize weight: (out, in) float with hessian: (in, in) float → dequantized (out, in) float32.

    `fit(w: (out, g)) -> params` is called once on the whole weight (after dead columns are zeroed)
    when group_size is None, else at the start of every group on that group's current, already
    error-updated columns (in act-order's permuted order when act_order is set, like the reference
    without static groups). `qdq(col: (out,), params) -> (out,)` quantizes-dequantizes one column.
    Inputs are not modified; work is in float32 on weight's device; the original column order is
    restored. Dead inputs (H[i, i] == 0, the input never fires) get H[i, i] = 1 and a zero column.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    params = fit(w) if group_size is None else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, percdamp)
    q = torch.zeros_like(w)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        params = _quantize_block(w, q, hinv, i1, i2, fit, qdq, params, group_size)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row vector v: (out,) reshaped to broadcast against like: (out,) or (out, k)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def rtn_params(
    w: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row RTN parameters of w: (out, g) float → (scale, zero), each (out,) float32.

    sym: scale = clip·max|w| / (2^(b−1) − 1), zero = 0. asym: range [clip·min(w, 0), clip·max(w, 0)]
    (0 kept inside so zero padding stays exact), scale = range / (2^b − 1), zero = round(−min / scale).
    clip: optional (out,) factors in (0, 1], FlatQuant's learnable weight clipping. All-zero rows
    get scale 1 instead of 0, so they quantize to 0 rather than NaN.
    """
    w = w.to(torch.float32)
    factor = 1.0 if clip is None else clip.to(device=w.device, dtype=torch.float32).reshape(-1)
    if sym:
        scale = factor * w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    lo = factor * w.amin(dim=1).clamp(max=0)
    hi = factor * w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / scale)


def rtn_qdq(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of w: (out,) or (out, k) float with per-row scale, zero: (out,).

    sym: clamp(round(w/s), −2^(b−1), 2^(b−1)−1)·s; asym: (clamp(round(w/s) + z, 0, 2^b−1) − z)·s.
    Returns float32 of w's shape.
    """
    s, z = _bcast(scale, w), _bcast(zero, w)
    if sym:
        return torch.clamp(torch.round(w / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return (torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1) - z) * s


def rtn_fit_qdq(bits: int, sym: bool, clip: torch.Tensor | None = None) -> tuple[FitFn, QdqFn]:
    """(fit, qdq) pair for `gptq_quantize` implementing per-output-channel (or per-group) RTN.

    fit(w: (out, g)) -> (scale, zero) each (out,); qdq(col: (out,) or (out, k), params) -> same shape.
    """
    def fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rtn_params(w, bits, sym, clip)

    def qdq(col: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return rtn_qdq(col, params[0], params[1], bits, sym)

    return fit, qdq


def rtn_quantize(
    weight: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """Plain RTN baseline: weight (out, in) float → dequantized (out, in) float32, per row or per group."""
    w = weight.detach().to(torch.float32)
    fit, qdq = rtn_fit_qdq(bits, sym, clip)
    step = w.shape[1] if group_size is None else group_size
    return torch.cat([qdq(g, fit(g)) for g in w.split(step, dim=1)], dim=1)
