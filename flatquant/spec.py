"""What gets quantized and how: one validated dataclass shared by every method.

Usage:
    qc = QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4)      # W4A4KV4
    qc.weight_spec(), qc.act_spec(), qc.kv_spec(head_dim=64)

Defaults follow the paper's W4A4KV4 setting: weights symmetric per output channel, activations
symmetric per token, K/V cache asymmetric per head; bits = 16 leaves a tensor in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from flatquant.quantizers import QuantSpec


def _check_bits(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 16:
        raise ValueError(f"quant.{name} must be an integer in 2..16, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 4
    w_sym: bool = True
    w_group_size: int = 0
    a_bits: int = 4
    a_sym: bool = True
    k_bits: int = 4
    k_sym: bool = False
    v_bits: int = 4
    v_sym: bool = False
    lwc: bool = True
    lac: bool = True
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "k_bits", "v_bits"):
            _check_bits(name, getattr(self, name))
        if self.w_group_size < 0:
            raise ValueError(f"quant.w_group_size must be >= 0, got {self.w_group_size}")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"quant.{name} must be in (0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quant keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def weight_spec(self) -> QuantSpec:
        if self.w_group_size:
            return QuantSpec(self.w_bits, self.w_sym, "group", self.w_group_size)
        return QuantSpec(self.w_bits, self.w_sym, "channel")

    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.a_bits, self.a_sym, "token", clip_ratio=self.a_clip_ratio)

    def kv_spec(self, which: str, head_dim: int) -> QuantSpec:
        bits, sym = (self.k_bits, self.k_sym) if which == "k" else (self.v_bits, self.v_sym)
        return QuantSpec(bits, sym, "head", head_dim, clip_ratio=self.kv_clip_ratio)

    @property
    def tag(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}kv{max(self.k_bits, self.v_bits)}"
