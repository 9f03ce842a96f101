"""GPTQ against RTN and against a plain (unblocked, float64) re-derivation of the algorithm."""

import pytest
import torch

from flatquant.gptq import (
    HessianAccumulator,
    gptq_quantize,
    rtn_fit_qdq,
    rtn_params,
    rtn_quantize,
)

OUT, IN, TOKENS = 64, 256, 2048


@pytest.fixture(scope="module")
def layer():
    """Seeded weight (64, 256) and correlated inputs X = Z A (2048, 256), so H = 2/N XᵀX is far from diagonal."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    x = torch.randn(TOKENS, IN, generator=gen) @ (torch.randn(IN, IN, generator=gen) / IN ** 0.5)
    return w, x, 2.0 / TOKENS * x.T @ x


def _output_error(x, w, w_q):
    return torch.linalg.matrix_norm(x @ w_q.T - x @ w.T).item()


CONFIGS = [{}, {"group_size": 64}, {"act_order": True}, {"act_order": True, "group_size": 64}]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(k) or "per_channel")
def test_gptq_beats_rtn(layer, bits, kwargs):
    w, x, h = layer
    fit, qdq = rtn_fit_qdq(bits, sym=True)
    gptq_err = _output_error(x, w, gptq_quantize(w, h, fit, qdq, **kwargs))
    rtn_err = _output_error(x, w, rtn_quantize(w, bits, sym=True, group_size=kwargs.get("group_size")))
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


def _recording(fit):
    """Wrap fit so the parameters of every call are kept, to check each group against its own grid."""
    calls = []

    def wrapped(w):
        calls.append(fit(w))
        return calls[-1]

    return wrapped, calls


@pytest.mark.parametrize("bits, sym", [(4, True), (3, True), (4, False)])
@pytest.mark.parametrize("kwargs", [{}, {"act_order": True}, {"group_size": 64}], ids=["channel", "act_order", "g64"])
def test_gptq_output_on_grid(layer, bits, sym, kwargs):
    w, _, h = layer
    fit, qdq = rtn_fit_qdq(bits, sym)
    fit, calls = _recording(fit)
    w_q = gptq_quantize(w, h, fit, qdq, **kwargs)
    step = kwargs.get("group_size", IN)
    assert len(calls) == IN // step
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    for group, (scale, zero) in zip(w_q.split(step, dim=1), calls):
        levels = group / scale[:, None] + zero[:, None]
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.round().min() >= lo and levels.round().max() <= hi


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_gives_zero_column(layer, act_order):
    w, x, _ = layer
    x = x.clone()
    x[:, 5] = 0
    h = 2.0 / TOKENS * x.T @ x
    fit, qdq = rtn_fit_qdq(4, sym=True)
    w_q = gptq_quantize(w, h, fit, qdq, act_order=act_order)
    assert torch.equal(w_q[:, 5], torch.zeros(OUT))
    assert torch.isfinite(w_q).all() and w_q.abs().sum() > 0


def test_inputs_untouched_and_float32(layer):
    w, _, h = layer
    w0, h0 = w.clone(), h.clone()
    fit, qdq = rtn_fit_qdq(4, sym=True)
    w_q = gptq_quantize(w.double(), h, fit, qdq, act_order=True)
    assert w_q.dtype == torch.float32 and w_q.shape == w.shape
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_lazy_blocks_match_one_block(layer):
    """Lazy batching is an exact reorganisation, also when groups (48) straddle blocks (128, 32, 7)."""
    w, _, h = layer
    fit, qdq = rtn_fit_qdq(4, sym=True)
    ref = gptq_quantize(w, h, fit, qdq, group_size=48, blocksize=IN)
    for blocksize in (128, 32, 7):
        out = gptq_quantize(w, h, fit, qdq, group_size=48, blocksize=blocksize)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def _naive_gptq(w, h, bits, percdamp=0.01):
    """OBQ-style GPTQ in float64 without Cholesky or blocks: quantize column i, spread its error
    with row i of the current inverse Hessian, then eliminate i from H⁻¹ (Frantar et al., eq. 2-3)."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    scale, zero = rtn_params(w, bits, sym=True)
    _, qdq = rtn_fit_qdq(bits, sym=True)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = qdq(w[:, i], (scale.double(), zero.double()))
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv -= hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return q


def test_matches_naive_reference(layer):
    w, _, h = layer
    fit, qdq = rtn_fit_qdq(4, sym=True)
    ours, ref = gptq_quantize(w, h, fit, qdq), _naive_gptq(w, h, 4).float()
    diff = (ours - ref).abs()
    print(f"max diff {diff.max():.3g}, mean diff {diff.mean():.3g}, rounding flips {(diff > 1e-4).float().mean():.2%}")
    assert (diff > 1e-4).float().mean() < 0.01


def test_hessian_accumulator_matches_one_shot(layer):
    _, x, h = layer
    acc = HessianAccumulator(IN)
    acc.add_batch(x[:700])
    acc.add_batch(x[700:].reshape(4, -1, IN).double())  # (batch, seq, in) and any float dtype
    assert acc.nsamples == TOKENS and acc.hessian.dtype == torch.float32
    rel = torch.linalg.matrix_norm(acc.hessian - h) / torch.linalg.matrix_norm(h)
    assert rel < 1e-6


def test_rtn_params_clip_and_asym():
    w = torch.tensor([[-2.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.3, 0.6, 1.5]])
    scale, zero = rtn_params(w, 4, sym=True, clip=torch.tensor([0.5, 1.0, 1.0]))
    torch.testing.assert_close(scale, torch.tensor([1.0 / 7, 1.0, 1.5 / 7]))
    assert torch.equal(zero, torch.zeros(3))
    scale, zero = rtn_params(w, 4, sym=False)
    torch.testing.assert_close(scale, torch.tensor([3.0 / 15, 1.0, 1.5 / 15]))
    torch.testing.assert_close(zero, torch.tensor([10.0, 0.0, 0.0]))
    assert torch.equal(rtn_quantize(w, 4, sym=False)[1], torch.zeros(3))
