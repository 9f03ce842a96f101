"""4-bit packing, one pair of functions per encoding, and the Kronecker factorisation of a size.

Usage:
    stored = pack_int4_offset(codes, spec.qmin)     # checkpoint / packed-layer format   codes: (rows, cols) ints
    codes = unpack_int4_offset(stored, spec.qmin)   # → (rows, cols) int16
    qw = pack_int4_twos(q)                          # what the W4A4 kernels read         q: (rows, cols) ints
    q = unpack_int4_twos(qw, signed=True)           # → (rows, cols) int32
    b = pack_e4m3(q)                                # one byte a code: e4m3fn of q·2^-9  (rows, cols) uint8
    n1, n2 = kron_dims(4096)                        # (64, 64): the factors of a Kronecker transform

Both encodings put two codes in a byte, the even column in the low nibble, and differ in what a nibble holds:

- offset binary: nibble = code − qmin, so any range [qmin, qmin + 15] fits (qmin = −8 symmetric, 0 asymmetric)
  and the reader must know qmin. `quantizers.pack_codes` / `unpack_codes` use it for the 4-bit weight codes
  of a QuantLayer's weights (`quant_layer.QuantWeight`) and of exported checkpoints (`flatquant.export`): changing it
  changes the bytes on disk.
- two's complement: nibble = code & 15, the low four bits of the integer itself; signed readers sign-extend
  (8..15 → −8..−1), unsigned ones read 0..15. The Triton kernels use it (flatquant/kernels/): `kron_quant`
  writes activations this way, `w4a4_gemm` and `QuantLinear` read activations and weights so;
  `QuantLinear.from_group` re-packs the offset-binary weight codes into it.

A third form holds one code a byte, for the fp8 GEMM (``flatquant.kernels.e4m3``): ``pack_e4m3`` writes an integer q
in [-15, 15] as the e4m3fn encoding of q·2^-9 — |q| ≤ 7 are subnormals (mantissa q, exponent 0), 8..15 have exponent
1 and mantissa q − 8, so the magnitude byte is |q| itself and the sign is bit 7. Every 4-bit code is exact, and a
product of two is an integer number of 2^-18, which fp32 accumulators hold exactly.

For symmetric codes (qmin = −8) the two differ by XOR 0x88 per byte: code + 8 ≡ (code & 15) + 8 (mod 16), and
adding 8 mod 16 flips only bit 3 of each nibble. For asymmetric codes (qmin = 0) they are the same bytes.
"""

from __future__ import annotations

import math

import torch


def kron_dims(n: int, allow_prime: bool = False) -> tuple[int, int]:
    """Factor n = n1·n2 with n1 the largest divisor ≤ √n, so n1 ≤ n2 as close to √n as possible (FlatQuant's
    decomposition): 4096 → (64, 64), 11008 → (86, 128), 14336 → (112, 128), 28672 → (128, 224).

    Raises ValueError when n has no factor pair other than 1·n (a prime size > 3), since a Kronecker transform
    would then be one dense n×n matrix; with allow_prime=True that case returns (1, n) instead (the kernels'
    identity factors for a group without a transform, where a factor of 1 is fine).
    """
    if n < 1:
        raise ValueError(f"transform size must be positive, got {n}")
    for n1 in range(math.isqrt(n), 0, -1):
        if n % n1 == 0:
            if n1 == 1 and n > 3 and not allow_prime:
                raise ValueError(
                    f"size {n} is prime: it has no Kronecker factorisation n1 x n2 with both factors > 1; "
                    "set the factors explicitly or use a dense transform"
                )
            return n1, n // n1
    raise AssertionError("unreachable")


def pack_int4_offset(codes: torch.Tensor, qmin: int) -> torch.Tensor:
    """(rows, cols) integer codes in [qmin, qmin + 15], cols even → (rows, cols // 2) uint8 (offset binary,
    low nibble = even column)."""
    u = (codes.to(torch.int16) - qmin).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4_offset(packed: torch.Tensor, qmin: int) -> torch.Tensor:
    """Inverse of pack_int4_offset: (rows, cols // 2) uint8 → (rows, cols) int16 codes."""
    lo, hi = (packed & 0xF).to(torch.int16), (packed >> 4).to(torch.int16)
    return torch.stack((lo, hi), dim=-1).flatten(-2) + qmin


def pack_int4_twos(q: torch.Tensor) -> torch.Tensor:
    """(rows, k) integers in [-8, 15] → (rows, k/2) uint8 (two's-complement nibbles q & 15, low nibble = even
    column)."""
    q = q.to(torch.int32) & 15
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4_twos(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of pack_int4_twos: (rows, k/2) uint8 → (rows, k) int32, sign-extending nibbles when ``signed``."""
    p = packed.to(torch.int32)
    q = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return torch.where(q > 7, q - 16, q) if signed else q


def pack_e4m3(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-15, 15] → uint8 of the same shape, the e4m3fn encoding of q·2^-9 (sign bit 7, magnitude |q|);
    ``.view(torch.float8_e4m3fn)`` reads them as those values."""
    q = q.to(torch.int32)
    return torch.where(q < 0, 128 - q, q).to(torch.uint8)
