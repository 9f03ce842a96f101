"""Hadamard and random orthogonal matrices for rotating LLM weights and activations.

Usage::

    H = hadamard_matrix(14336)                       # (14336, 14336) float64, entries ±1
    Q = random_hadamard(4096, seed=0)                # orthogonal: H·diag(±1)/√n
    R, kind = orthogonal_or_hadamard(9, seed=0)      # falls back to a random orthogonal matrix

Why: rotation-based quantizers (QuaRot, SpinQuant, FlatQuant's initialisation and online
down_proj transform, arXiv 2410.09426) need an orthogonal matrix of every hidden / intermediate
size, and a Hadamard one spreads outliers evenly at no storage cost. LLM sizes are rarely powers
of two (e.g. 11008, 14336, 27648), so a matrix of order n = 2^k · m is built as the Kronecker
product of a Sylvester matrix of order 2^k with Paley matrices for m:

- Paley I: order q + 1 for a prime q ≡ 3 (mod 4)  (12, 20, 24, 44, 48, 60, 108, 5504, ...)
- Paley II: order 2(q + 1) for a prime q ≡ 1 (mod 4)  (12, 28, 36, 60, 76, 148, ...)

and, when no single Paley block fits, m as a product of Paley orders. The Kronecker product of
Hadamard matrices is Hadamard, so exactness only depends on each block being exact. Only prime
q are used (no GF(p^k) arithmetic), so e.g. 52 = 2(25 + 1) and 172 raise ValueError.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from flatquant import transforms

Block = tuple[str, int]  # (kind, order), kind in {"sylvester", "paley1", "paley2"}


def _is_prime(q: int) -> bool:
    """Trial division; q stays below ~10^5 for any LLM width, so this is instant."""
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _paley_block(m: int) -> Block | None:
    """The Paley construction of order m, if one exists (Paley I preferred: half the size of its q)."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m)
    if m >= 6 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return ("paley2", m)
    return None


@lru_cache(maxsize=None)
def _paley_product(m: int) -> tuple[Block, ...] | None:
    """Fewest Paley blocks whose orders multiply to m (each order is a multiple of 4), or None."""
    single = _paley_block(m)
    if single is not None:
        return (single,)
    best = None
    for d in range(12, math.isqrt(m) + 1, 4):
        if m % d or (m // d) % 4:
            continue
        left, right = _paley_product(d), _paley_product(m // d)
        if left is not None and right is not None and (best is None or len(left + right) < len(best)):
            best = left + right
    return best


@lru_cache(maxsize=None)
def hadamard_construction(n: int) -> tuple[Block, ...]:
    """Plan for a Hadamard matrix of order n: Kronecker factors as (kind, order) pairs.

    Tries every split n = 2^k · m, largest power of two first so the Paley part (the only
    part that costs work to build) stays as small as possible; m must be 1 or a product of
    Paley orders. Raises ValueError naming n when no known construction fits, e.g. n = 6 or 9
    (a Hadamard order must be 1, 2 or a multiple of 4).

    Example: 14336 -> (("sylvester", 512), ("paley2", 28)); 11008 -> (("sylvester", 2), ("paley1", 5504)).
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got n={n}")
    k = (n & -n).bit_length() - 1  # exponent of 2 in n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1:
            return (("sylvester", n),)
        paley = _paley_product(m)
        if paley is not None:
            return ((("sylvester", 1 << j),) if j else ()) + paley
    raise ValueError(
        f"no Hadamard construction known for n={n}: need n = 2^k * m with m a product of "
        f"Paley orders (q+1, q prime = 3 mod 4; 2(q+1), q prime = 1 mod 4)"
    )


def has_hadamard(n: int) -> bool:
    """Whether hadamard_matrix(n) succeeds."""
    try:
        hadamard_construction(n)
    except ValueError:
        return False
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ mod prime q: (q, q) int8.

    Q is skew-symmetric for q ≡ 3 (mod 4) and symmetric for q ≡ 1; in both cases
    Q Qᵀ = q I − J and Q J = 0, which is what makes the Paley matrices Hadamard.
    """
    chi = -torch.ones(q, dtype=torch.int8)
    chi[(torch.arange(1, q, dtype=torch.int64) ** 2) % q] = 1
    chi[0] = 0
    windows = torch.cat([chi, chi]).unfold(0, q, 1)  # windows[k, j] = χ((k + j) mod q)
    return windows[1:q + 1].flip(0).contiguous()  # row i is window q − i


def _paley1(order: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order q + 1 (q ≡ 3 mod 4): I + [[0, 1ᵀ], [−1, Q]], (order, order) int8."""
    q = order - 1
    h = torch.zeros(order, order, dtype=torch.int8)
    h[0, 1:], h[1:, 0], h[1:, 1:] = 1, -1, _jacobsthal(q)
    return h + torch.eye(order, dtype=torch.int8)


def _paley2(order: int) -> torch.Tensor:
    """Paley II Hadamard matrix of order 2(q + 1) (q ≡ 1 mod 4), (order, order) int8.

    From the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]]: replace 0 by [[1, −1], [−1, −1]]
    and ±1 by ±[[1, 1], [1, −1]].
    """
    q = order // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    zero = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int8), zero)


def _sylvester(order: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order 2^k: H[i, j] = (−1)^popcount(i & j), (order, order) int8."""
    h = torch.ones(1, 1, dtype=torch.int8)
    base = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    while h.shape[0] < order:
        h = torch.kron(h, base)
    return h


_BUILDERS = {"sylvester": _sylvester, "paley1": _paley1, "paley2": _paley2}


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Unnormalised Hadamard matrix of order n: (n, n) `dtype`, entries ±1, H Hᵀ = n I.

    Built as the Kronecker product of the blocks of `hadamard_construction(n)`; each block is
    made in int8 on the CPU (exact, small) and the products are taken on `device` in `dtype`,
    so the only large allocation is the result (n² elements: 1.6 GB at n = 14336 in float64).
    Raises ValueError naming n when no construction is known.
    """
    blocks = [_BUILDERS[kind](order) for kind, order in hadamard_construction(n)]
    h = blocks[0].to(device=device, dtype=dtype)
    for block in blocks[1:]:
        h = torch.kron(h, block.to(device=device, dtype=dtype))
    return h


def _sign_vector(n: int, seed: int) -> torch.Tensor:
    """Seeded random ±1 vector: (n,) float64, drawn on the CPU so every device gets the same signs."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Randomised orthogonal Hadamard matrix H · diag(s) / √n with seeded signs s: (n, n) `dtype`.

    The random signs (QuaRot's "randomized Hadamard") decorrelate the rotation from any
    structure in the weights while keeping the outlier-spreading property. Raises ValueError
    like `hadamard_matrix` when n has no construction; use `orthogonal_or_hadamard` to fall back.
    """
    signs = _sign_vector(n, seed).to(device=device, dtype=dtype)
    h = hadamard_matrix(n, dtype=dtype, device=device)
    h.mul_(signs / math.sqrt(n))
    return h


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix: (n, n) `dtype` (see transforms.random_orthogonal)."""
    q = transforms.random_orthogonal(n, torch.Generator().manual_seed(seed))
    return q.to(device=device, dtype=dtype)


def orthogonal_or_hadamard(
    n: int, seed: int, dtype: torch.dtype = torch.float64, device=None
) -> tuple[torch.Tensor, str]:
    """Orthogonal (n, n) `dtype` matrix and its kind: "hadamard" when n has a construction, else
    "random_orthogonal" (e.g. n = 9 attention heads, where no Hadamard matrix can exist)."""
    if has_hadamard(n):
        return random_hadamard(n, seed, dtype=dtype, device=device), "hadamard"
    return random_orthogonal(n, seed, dtype=dtype, device=device), "random_orthogonal"
