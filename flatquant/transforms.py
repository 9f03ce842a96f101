"""Invertible affine transforms: Kronecker products of small matrices, in FlatQuant's SVD form.

Usage:
    t = KronTransform(4096, add_diag=True)        # P = P1 ⊗ P2, 64 × 64, learnable
    x_t = t.act(x)                                # x · diag(1/d) · P         x: (..., 4096)
    w_t = t.weight(w)                             # w · diag(d) · P⁻ᵀ         w: (out, 4096)
    # then x_t @ w_t.T == x @ w.T up to rounding: X·W = (X·P)(P⁻¹·W)  (FlatQuant eq. 3)

Each factor is U·diag(s)·Vᵀ with U, V orthogonal (Cayley map of a skew matrix times a fixed orthogonal
start), so P⁻ᵀ = U·diag(1/s)·Vᵀ costs no matrix inversion. For a row vector x of length n1·n2 viewed as
an (n1, n2) matrix X in row-major order, x·(L ⊗ R) is Lᵀ·X·R: two small matmuls per token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from flatquant.packing import kron_dims


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """x · (left ⊗ right) over the last axis.

    x: (..., n1·n2); left: (n1, n1) or None (identity); right: (n2, n2) or None.
    Returns the same shape; computed in the matrices' dtype.
    """
    if left is None and right is None:
        return x
    n1 = left.shape[0] if left is not None else x.shape[-1] // right.shape[0]
    n2 = right.shape[0] if right is not None else x.shape[-1] // n1
    y = x.reshape(*x.shape[:-1], n1, n2)
    if right is not None:
        y = torch.matmul(y, right.to(y.dtype))
    if left is not None:
        y = torch.matmul(left.t().to(y.dtype), y)
    return y.reshape(x.shape)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random (n, n) orthogonal float64 matrix: QR of a Gaussian with Q's columns multiplied by
    sign(diag R), which makes the factorisation unique and the distribution Haar (Mezzadri 2007)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).unsqueeze(0)


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal matrix (I − S)(I + S)⁻¹ from the skew part S of a; the identity at a = 0."""
    s = a - a.t()
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve_ex(eye + s, eye - s)[0]  # I + S is never singular (S skew): skip solve's host sync


class SVDFactor(nn.Module):
    """One learnable invertible factor M = U·diag(s)·Vᵀ, U = cayley(A)·U0, V = cayley(B).

    U0 is a fixed random orthogonal start, so at initialisation M = U0 (the random-orthogonal start
    that calibration improves on). matrix(inv_t=True) is M⁻ᵀ = U·diag(1/s)·Vᵀ.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__()
        self.n = n
        self.register_buffer("u0", random_orthogonal(n, generator))  # float64: exactly orthogonal, so P⁻ᵀ is exact
        self.skew_u = nn.Parameter(torch.zeros(n, n))
        self.skew_v = nn.Parameter(torch.zeros(n, n))
        self.log_s = nn.Parameter(torch.zeros(n))

    def matrix(self, inv_t: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.pair(dtype)[int(inv_t)]

    def pair(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, M⁻ᵀ) from one pair of Cayley solves."""
        dtype = dtype or torch.float32
        u = cayley(self.skew_u.to(dtype)) @ self.u0.to(dtype)
        vt = cayley(self.skew_v.to(dtype)).t()
        s = torch.exp(self.log_s).to(dtype).unsqueeze(0)
        return (u * s) @ vt, (u / s) @ vt


class FixedFactor(nn.Module):
    """A fixed orthogonal factor Q (e.g. a normalised random Hadamard): Q⁻ᵀ = Q."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.n = q.shape[0]
        self.register_buffer("q", q.double())

    def matrix(self, inv_t: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.q.to(dtype or torch.float32)

    def pair(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.matrix(False, dtype)
        return q, q


class KronTransform(nn.Module):
    """P = left ⊗ right with an optional per-channel scale d (FlatQuant's add_diag).

    act(x) = x·diag(1/d)·P and weight(w) = w·diag(d)·P⁻ᵀ for rows w of a linear's weight, so
    act(x) @ weight(w).T equals x @ w.T. d is folded into the preceding norm or linear at merge time,
    which is why it is kept apart from P. A factor of None stands for the identity.
    """

    def __init__(self, left: nn.Module | None, right: nn.Module | None, n: int, add_diag: bool = False):
        super().__init__()
        self.n = n
        self.left, self.right = left, right
        self.diag = nn.Parameter(torch.ones(n)) if add_diag else None
        self._frozen: dict[bool, tuple] | None = None  # per-forward cache (cached_matrices)
        self.is_frozen = False  # freeze() stores the matrices as buffers, so .to() moves them with the layer

    @classmethod
    def diagonal(cls, scale: torch.Tensor) -> "KronTransform":
        """Only the per-channel scale (SmoothQuant): P = I."""
        t = cls(None, None, scale.numel(), add_diag=True)
        t.diag.data.copy_(scale)
        return t

    @classmethod
    def fixed(cls, left: torch.Tensor | None, right: torch.Tensor | None, n: int, scale: torch.Tensor | None = None):
        """Fixed orthogonal factors (e.g. Hadamard, QuaRot), with an optional fixed per-channel scale."""
        t = cls(None if left is None else FixedFactor(left), None if right is None else FixedFactor(right), n, scale is not None)
        if scale is not None:
            t.diag.data.copy_(scale)
        return t

    @classmethod
    def learnable(cls, n: int, factors: tuple[int, int] | None = None, add_diag: bool = False, generator=None):
        n1, n2 = factors or kron_dims(n)
        if n1 * n2 != n:
            raise ValueError(f"factors {n1}x{n2} do not multiply to {n}")
        left = SVDFactor(n1, generator) if n1 > 1 else None
        right = SVDFactor(n2, generator) if n2 > 1 else None
        return cls(left, right, n, add_diag)

    def matrices(self, inv_t: bool = False, dtype: torch.dtype | None = None):
        if self._frozen is not None and dtype in (None, torch.float32):
            return self._frozen[inv_t]
        if self.is_frozen and dtype in (None, torch.float32):
            return tuple(getattr(self, f"frozen_{int(inv_t)}_{side}") for side in ("left", "right"))
        return tuple(None if f is None else f.matrix(inv_t, dtype) for f in (self.left, self.right))

    def dense(self, inv_t: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (n, n) matrix P (or P⁻ᵀ), for small transforms used as one factor of a bigger one.

        A factor left out (None) has size 1 by construction, so the present factors multiply to n.
        """
        mats = [m for m in self.matrices(inv_t, dtype) if m is not None]
        if not mats:
            return torch.eye(self.n, dtype=dtype or torch.float32)
        return mats[0] if len(mats) == 1 else torch.kron(mats[0], mats[1])

    def apply(self, x: torch.Tensor, inv_t: bool = False) -> torch.Tensor:
        """x · P (or x · P⁻ᵀ) over the last axis, without the diagonal scale."""
        left, right = self.matrices(inv_t, torch.float64 if x.dtype == torch.float64 else None)
        return kron_apply(x, left, right).to(x.dtype)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.diag is not None:
            x = x / self.diag.to(x.dtype)
        return self.apply(x)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.diag is not None:
            w = w * self.diag.to(w.dtype)
        return self.apply(w, inv_t=True)

    def both_matrices(self, dtype: torch.dtype | None = None) -> dict[bool, tuple]:
        """{inv_t: (left, right)} for P and P⁻ᵀ from one pair of Cayley solves per factor."""
        pairs = [(None, None) if f is None else f.pair(dtype) for f in (self.left, self.right)]
        return {inv: tuple(p[int(inv)] for p in pairs) for inv in (False, True)}

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute both matrix pairs once (in float64, then float32) for evaluation.

        They become non-persistent buffers: moved by .to() (layer offloading), absent from state_dict."""
        for inv, ms in self.both_matrices(torch.float64).items():
            for side, m in zip(("left", "right"), ms):
                self.register_buffer(f"frozen_{int(inv)}_{side}", None if m is None else m.float(), persistent=False)
        self.is_frozen = True


@contextmanager
def cached_matrices(transforms, enabled: bool = True):
    """Compute each transform's matrices once for the duration of one forward (gradients kept).

    A layer's forward uses the qkv transform's P for the activation and P⁻ᵀ for three weights; caching
    saves the repeated Cayley solves.
    """
    todo = [t for t in transforms if t._frozen is None and not t.is_frozen] if enabled else []
    for t in todo:
        t._frozen = t.both_matrices()
    try:
        yield
    finally:
        for t in todo:
            t._frozen = None
