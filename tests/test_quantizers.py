"""Quantizers against hand-computed examples."""

import pytest
import torch

from flatquant.quantizers import QuantSpec, Quantizer, fake_quant, quantize
from flatquant.spec import QuantConfig


def test_symmetric_per_token_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5], [0.1, 0.2, -0.7, 0.0]])
    q, scale, zero = quantize(x, QuantSpec(4, sym=True, granularity="token"))
    # row 0: max|x| = 3.5 → scale 0.5; row 1: max 0.7 → scale 0.1
    assert torch.allclose(scale.squeeze(), torch.tensor([0.5, 0.1]))
    assert torch.equal(q[0], torch.tensor([2.0, -4.0, 1.0, 7.0]))
    assert torch.equal(q[1], torch.tensor([1.0, 2.0, -7.0, 0.0]))
    assert torch.all(zero == 0)


def test_asymmetric_per_token_by_hand():
    x = torch.tensor([[0.0, 1.5, -1.5, 3.0]])
    q, scale, zero = quantize(x, QuantSpec(4, sym=False, granularity="token"))
    # range [-1.5, 3.0] → scale 4.5/15 = 0.3, zero = round(1.5/0.3) = 5
    assert torch.allclose(scale, torch.tensor([[0.3]]))
    assert zero.item() == 5
    assert torch.equal(q, torch.tensor([[5.0, 10.0, 0.0, 15.0]]))
    deq = fake_quant(x, QuantSpec(4, sym=False))
    assert torch.allclose(deq, x, atol=1e-6)


def test_per_channel_clip_and_groups():
    w = torch.tensor([[4.0, -8.0, 2.5, 1.0], [1.0, 1.0, 1.0, -1.0]])
    # clip 0.5 on row 0: max 8 → 4, scale 4/7; -8/(4/7) = -14 clamps to qmin = -8
    q, scale, _ = quantize(w, QuantSpec(4, sym=True, granularity="channel"), clip=torch.tensor([[0.5], [1.0]]))
    assert torch.allclose(scale.squeeze(), torch.tensor([4 / 7, 1 / 7]))
    assert torch.equal(q[0], torch.tensor([7.0, -8.0, 4.0, 2.0]))  # 4/(4/7) = 7, -14 → -8, 4.375 → 4, 1.75 → 2
    g, gscale, _ = quantize(w, QuantSpec(4, sym=True, granularity="group", group_size=2))
    assert g.shape == (2, 2, 2)
    assert torch.allclose(gscale.squeeze(-1), torch.tensor([[8 / 7, 2.5 / 7], [1 / 7, 1 / 7]]))


def test_per_head_and_sixteen_bits_passthrough():
    x = torch.randn(3, 5, 2 * 8)
    y = fake_quant(x, QuantSpec(4, sym=False, granularity="head", group_size=8))
    for h in range(2):
        ref = fake_quant(x[..., h * 8 : (h + 1) * 8], QuantSpec(4, sym=False, granularity="token"))
        assert torch.allclose(y[..., h * 8 : (h + 1) * 8], ref)
    assert torch.equal(fake_quant(x, QuantSpec(16)), x)


def test_ste_gradient_and_learnable_clip():
    quant = Quantizer(QuantSpec(4, sym=True, granularity="channel"), learnable_clip=True, rows=3)
    assert torch.allclose(quant.clip(), torch.sigmoid(torch.tensor(4.0)).expand(3, 1))
    w = torch.randn(3, 16, requires_grad=True)
    quant(w).sum().backward()
    assert w.grad is not None and quant.clip_logit.grad is not None
    assert torch.isfinite(quant.clip_logit.grad).all()


@pytest.mark.parametrize("bad", [1, 17, 0, 2.5, "4"])
def test_bits_out_of_range_named(bad):
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=bad)


def test_unknown_quant_key_named():
    with pytest.raises(ValueError, match="wbits"):
        QuantConfig.from_dict({"wbits": 4})
