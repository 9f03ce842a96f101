"""Triton kernels for W4A4 inference with FlatQuant transforms, each beside its plain-PyTorch reference.

Triton is optional: without it (or without CUDA and TRITON_INTERPRET=1) every entry point falls back to
its reference, so importing this package always works.

Names are imported lazily (PEP 562): importing the package imports nothing (no triton) until a kernel is used
(Triton fixes compiled vs interpreted mode when it is imported). The package lived at the top level as
``kernels`` until it was moved here: that name belongs to Hugging Face's kernel-hub library, which transformers
probes for with ``import kernels``.

Packing (the two's-complement nibbles the kernels read and write) and the Kronecker factorisation live in
``flatquant.packing``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HAS_TRITON": "kron_quant", "kron_quant": "kron_quant", "kron_quant_ref": "kron_quant",
    "QuantLinear": "qlinear", "merge_kron_into_weight": "qlinear", "quantize_weight_rtn": "qlinear",
    "w4a4_gemm": "w4a4_gemm", "w4a4_gemm_ref": "w4a4_gemm", "weight_sums": "w4a4_gemm",
}
__all__ = [  # noqa: RUF022 (grouped by module, as _EXPORTS)
    "HAS_TRITON", "kron_quant", "kron_quant_ref",
    "QuantLinear", "merge_kron_into_weight", "quantize_weight_rtn",
    "w4a4_gemm", "w4a4_gemm_ref", "weight_sums",
]


def __getattr__(name: str):
    """First access imports the three kernel modules and binds every exported name (a function that shares
    its module's name, like ``kron_quant``, then replaces the submodule attribute the import set)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(importlib.import_module(f".{module}", __name__), export)
    return globals()[name]
