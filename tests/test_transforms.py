"""Kronecker transforms: the identity X·P·P⁻¹·W = X·W, the factor choice, and kron_apply against torch.kron."""

import pytest
import torch

from flatquant.packing import kron_dims
from flatquant.transforms import KronTransform, kron_apply


@pytest.mark.parametrize("n,dims", [(4096, (64, 64)), (14336, (112, 128)), (11008, (86, 128)), (576, (24, 24)), (1536, (32, 48))])
def test_kron_dims_match_reference(n, dims):
    assert kron_dims(n) == dims


def test_prime_size_is_refused():
    with pytest.raises(ValueError, match="4099"):
        kron_dims(4099)


def _randomised(n, add_diag=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = KronTransform.learnable(n, add_diag=add_diag, generator=g)
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name == "diag":
                p.abs_().add_(0.1)
    return t


def test_kron_apply_equals_dense_kronecker():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 48, generator=g, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, left, right), x @ torch.kron(left, right), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [96, 576, 1536])
def test_transform_inverse_identity_float64(n):
    """X·P·P⁻¹·W = X·W: act() and weight() cancel exactly, diagonal scale included (rel < 1e-10)."""
    t = _randomised(n).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    w = torch.randn(11, n, generator=g, dtype=torch.float64)
    ref = x @ w.t()
    out = t.act(x) @ t.weight(w).t()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-10
    assert not torch.allclose(t.act(x), x)  # the transform is far from the identity


def test_svd_form_inverse_transpose():
    t = _randomised(48, add_diag=False).double()
    left, right = t.matrices(inv_t=False, dtype=torch.float64)
    left_it, right_it = t.matrices(inv_t=True, dtype=torch.float64)
    eye = torch.eye(left.shape[0], dtype=torch.float64)
    assert torch.allclose(left.t() @ left_it, eye, atol=1e-12)  # P⁻ᵀ really is the inverse transpose
    assert torch.allclose(right @ right_it.t(), torch.eye(right.shape[0], dtype=torch.float64), atol=1e-12)


def test_frozen_matrices_match_live_ones():
    t = _randomised(96)
    live = t.matrices(False)
    t.freeze()
    frozen = t.matrices(False)
    for a, b in zip(live, frozen):
        assert torch.allclose(a, b, atol=1e-6)
