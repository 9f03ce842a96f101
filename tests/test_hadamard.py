"""Exactness of the Hadamard constructions and orthogonality of the seeded rotations."""

import os

import pytest
import torch

from flatquant.hadamard import (
    _BUILDERS,
    has_hadamard,
    hadamard_construction,
    hadamard_matrix,
    orthogonal_or_hadamard,
    random_hadamard,
)

# Orders of the Paley blocks and the hidden / intermediate / head sizes of common LLMs.
EXACT_SIZES = [1, 2, 4, 12, 20, 24, 28, 36, 44, 48, 64, 76, 108, 128, 148, 576, 896, 1536, 4096]
LARGE_SIZES = [4864, 5120, 11008, 14336]
HUGE_SIZES = [13824, 18944, 27648]  # slow to build and check: only their blocks are checked by default
SLOW = os.environ.get("FLATQUANT_SLOW_TESTS") == "1"


@pytest.mark.parametrize("n", EXACT_SIZES)
def test_hadamard_exact(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def _freivalds(h: torch.Tensor, trials: int = 8, chunk: int = 2048) -> bool:
    """Hᵀ (H V) == n V for random ±1 V: (n, trials), with h: (n, n) int8 upcast in row chunks.

    For an integer H with Hᵀ H ≠ n I (equivalent to H Hᵀ ≠ n I for square H) each column of V
    catches the defect with probability ≥ 1/2, at O(n²) instead of the O(n³) of H Hᵀ. Every
    partial sum of H V is an integer below n < 2^24, exact in float32; those of Hᵀ (H V) reach
    n², so that product runs in float64.
    """
    n = h.shape[0]
    v = torch.randint(0, 2, (n, trials), generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 2 - 1
    rows = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    hv = torch.cat([h[r].float() @ v.float() for r in rows]).double()
    return torch.equal(sum(h[r].double().T @ hv[r] for r in rows), n * v)


@pytest.mark.parametrize("n", LARGE_SIZES + [pytest.param(n, marks=pytest.mark.skipif(
    not SLOW, reason="set FLATQUANT_SLOW_TESTS=1 to materialize")) for n in HUGE_SIZES])
def test_hadamard_large(n):
    h = hadamard_matrix(n, dtype=torch.int8)  # n² bytes: 205 MB at n = 14336
    assert h.shape == (n, n)
    assert bool((h * h == 1).all())  # int8 abs() is slow on the CPU
    assert _freivalds(h)


def test_freivalds_catches_one_flipped_sign():
    h = hadamard_matrix(1536, dtype=torch.int8)
    assert _freivalds(h)
    h[700, 3] *= -1
    assert not _freivalds(h)


@pytest.mark.parametrize("n", HUGE_SIZES)
def test_huge_sizes_have_exact_blocks(n):
    """A Kronecker product of Hadamard matrices is Hadamard, so exact blocks imply an exact result."""
    blocks = hadamard_construction(n)
    assert torch.tensor([order for _, order in blocks]).prod().item() == n
    for kind, order in blocks:
        b = _BUILDERS[kind](order).to(torch.float64)
        assert torch.equal(b @ b.T, order * torch.eye(order, dtype=torch.float64))


def test_construction_prefers_small_paley_block():
    assert hadamard_construction(14336) == (("sylvester", 512), ("paley2", 28))
    assert hadamard_construction(11008) == (("sylvester", 2), ("paley1", 5504))


@pytest.mark.parametrize("n", [0, 6, 9, 52, 172])
def test_unknown_order_raises_naming_n(n):
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard_matrix(n)
    with pytest.raises(ValueError, match=f"n={n}"):
        random_hadamard(n, seed=0)


@pytest.mark.parametrize("n", [28, 576, 1536])
def test_random_hadamard_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=3)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.linalg.matrix_norm(q @ q.T - eye) < 1e-12
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.equal(q, random_hadamard(n, seed=4))
    assert torch.equal((q * n ** 0.5).abs().round(), torch.ones_like(q))


@pytest.mark.parametrize("n, kind", [(9, "random_orthogonal"), (6, "random_orthogonal"), (64, "hadamard")])
def test_orthogonal_or_hadamard(n, kind):
    q, got = orthogonal_or_hadamard(n, seed=0)
    assert got == kind and q.shape == (n, n)
    assert torch.linalg.matrix_norm(q @ q.T - torch.eye(n, dtype=torch.float64)) < 1e-12
    assert torch.equal(q, orthogonal_or_hadamard(n, seed=0)[0])
    assert orthogonal_or_hadamard(n, seed=0, dtype=torch.float32)[0].dtype == torch.float32
