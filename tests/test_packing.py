"""flatquant.packing: both 4-bit encodings against bytes worked out by hand, and the Kronecker factorisation."""

import ast
from pathlib import Path

import pytest
import torch

import flatquant.packing
from flatquant.packing import (
    kron_dims,
    pack_int4_offset,
    pack_int4_twos,
    unpack_int4_offset,
    unpack_int4_twos,
)
from flatquant.quantizers import QuantSpec, pack_codes


def _every_pair(lo: int) -> torch.Tensor:
    """(1, 512) codes in [lo, lo + 15] whose (even, odd) column pairs are all 256 combinations."""
    even, odd = torch.meshgrid(torch.arange(lo, lo + 16), torch.arange(lo, lo + 16), indexing="ij")
    return torch.stack((even.flatten(), odd.flatten()), dim=-1).reshape(1, -1)


@pytest.mark.parametrize("qmin", [-8, 0])
def test_offset_round_trips_every_code(qmin):
    codes = _every_pair(qmin)
    packed = pack_int4_offset(codes, qmin)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    # nibble = code − qmin, even column low: the pairs enumerate every byte exactly once, in order
    assert torch.equal(packed[0].long(), ((codes[0, 1::2] - qmin) << 4) + (codes[0, 0::2] - qmin))
    assert sorted(packed[0].tolist()) == list(range(256))
    out = unpack_int4_offset(packed, qmin)
    assert out.dtype == torch.int16 and torch.equal(out, codes.to(torch.int16))


@pytest.mark.parametrize("signed", [True, False])
def test_twos_round_trips_every_code(signed):
    codes = _every_pair(-8 if signed else 0)
    packed = pack_int4_twos(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert torch.equal(packed[0].long(), ((codes[0, 1::2] & 15) << 4) + (codes[0, 0::2] & 15))
    assert sorted(packed[0].tolist()) == list(range(256))
    out = unpack_int4_twos(packed, signed)
    assert out.dtype == torch.int32 and torch.equal(out, codes.int())


@pytest.mark.parametrize("codes,qmin,offset_byte,twos_byte", [
    ([-8, 7], -8, 0xF0, 0x78),  # offset: 0 low, 15 high; twos: -8 → 0b1000 low, 7 high
    ([7, -8], -8, 0x0F, 0x87),
    ([-1, 1], -8, 0x97, 0x1F),  # offset: 7 low, 9 high; twos: -1 → 0b1111 low, 1 high
    ([0, 0], -8, 0x88, 0x00),
    ([0, 15], 0, 0xF0, 0xF0),  # unsigned codes: both encodings are the same bytes
    ([3, 10], 0, 0xA3, 0xA3),
])
def test_bytes_by_hand(codes, qmin, offset_byte, twos_byte):
    c = torch.tensor([codes])
    assert pack_int4_offset(c, qmin).tolist() == [[offset_byte]]
    assert pack_int4_twos(c).tolist() == [[twos_byte]]
    assert unpack_int4_offset(torch.tensor([[offset_byte]], dtype=torch.uint8), qmin).tolist() == [codes]
    assert unpack_int4_twos(torch.tensor([[twos_byte]], dtype=torch.uint8), qmin < 0).tolist() == [codes]


def test_signed_encodings_differ_by_xor_0x88():
    """For qmin = -8 the offset nibble is q + 8 and the two's-complement nibble q mod 16; adding 8 mod 16 flips
    bit 3 and nothing else, so every byte differs by 0x88 (bit 3 of both nibbles)."""
    codes = torch.randint(-8, 8, (7, 18), generator=torch.Generator().manual_seed(0))
    offset, twos = pack_int4_offset(codes, -8), pack_int4_twos(codes)
    assert torch.equal(offset ^ 0x88, twos)
    assert torch.equal(unpack_int4_twos(offset ^ 0x88, True), codes.int())


def test_checkpoint_codes_are_offset_binary():
    """pack_codes (what export writes) keeps the offset encoding: the on-disk bytes do not change."""
    codes = torch.tensor([[-8, 7, -1, 1]])
    assert pack_codes(codes, QuantSpec(bits=4, sym=True)).tolist() == [[0xF0, 0x97]]
    assert pack_codes(torch.tensor([[0, 15, 3, 10]]), QuantSpec(bits=4, sym=False)).tolist() == [[0xF0, 0xA3]]


@pytest.mark.parametrize("n,dims", [(4096, (64, 64)), (14336, (112, 128)), (28672, (128, 224)), (11008, (86, 128)),
                                    (5120, (64, 80)), (8192, (64, 128)), (13824, (108, 128)), (576, (24, 24)),
                                    (1536, (32, 48)), (2, (1, 2)), (3, (1, 3))])
def test_kron_dims(n, dims):
    assert kron_dims(n) == dims
    assert kron_dims(n, allow_prime=True) == dims


def test_prime_is_refused_unless_allowed():
    with pytest.raises(ValueError, match="size 4099 is prime"):
        kron_dims(4099)
    assert kron_dims(4099, allow_prime=True) == (1, 4099)
    with pytest.raises(ValueError, match="must be positive"):
        kron_dims(0, allow_prime=True)


def test_packing_is_a_leaf_module():
    """It imports only math and torch, so the kernels and the quantizers can both use it."""
    tree = ast.parse(Path(flatquant.packing.__file__).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "torch"}, imported


def test_kernels_import_only_the_leaf():
    """flatquant/kernels reads packing and rope (and the quantizers, for a fallback's reference), never the layer, the
    methods or the calibration: the layer swaps kernels in, not the other way round."""
    kernels = Path(flatquant.packing.__file__).parent / "kernels"
    for path in sorted(kernels.glob("*.py")):
        tree = ast.parse(path.read_text())
        core = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                and node.level == 0 and node.module.startswith("flatquant.") and not node.module.startswith("flatquant.kernels")}
        assert core <= {"flatquant.packing", "flatquant.quantizers", "flatquant.rope"}, (path.name, core)
