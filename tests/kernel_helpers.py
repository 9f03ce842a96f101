"""What the kernel test modules share: where the kernels run, the marks that skip them, and the two subprocesses
(the module again under the Triton interpreter; a snippet with triton made unimportable).

Import it after the module has set TRITON_INTERPRET (tests/test_kernels.py, tests/test_kv_cache.py do so first).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flatquant.kernels.kron_quant import HAS_TRITON, use_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Another test module may have imported triton (torch does on some paths) before TRITON_INTERPRET was set:
# then the interpreter tests run again in a fresh process (each module's test_interpreter_tests_in_subprocess).
RERUN = (HAS_TRITON and DEVICE == "cpu" and not use_triton(torch.empty(0))
         and os.environ.get("FQ_KERNEL_TESTS_SUBPROCESS") != "1")
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                  reason="run in a subprocess: triton was imported before TRITON_INTERPRET"
                                  if RERUN else "triton missing")
needs_rerun = pytest.mark.skipif(not RERUN, reason="the interpreter tests ran in this process")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run_without_triton(code: str, timeout: int) -> None:
    """Run `code` in a fresh Python with triton made unimportable; fail the test with its stderr if it fails."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None\n" + code], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def rerun_under_interpreter(test_file: str, timeout: int) -> str:
    """Run the test module `test_file` again in a fresh pytest under TRITON_INTERPRET=1; its stdout, after failing
    the test if that run failed."""
    env = dict(os.environ, TRITON_INTERPRET="1", FQ_KERNEL_TESTS_SUBPROCESS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


def fp8_accumulation_probe(M: int, N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes that test an fp8 GEMM's accumulation: (M, K) and (N, K) integer tensors on CUDA, 7/8 of k at −8 (each
    product 64), then ±1 (random, from ``g``), whose sums fall below the last bit a 14-bit accumulator keeps."""
    k0 = K * 7 // 8
    probe_a = torch.full((M, K), -8, device="cuda")
    probe_w = torch.full((N, K), -8, device="cuda")
    probe_a[:, k0:] = torch.randint(0, 2, (M, K - k0), device="cuda", generator=g) * 2 - 1
    probe_w[:, k0:] = torch.randint(0, 2, (N, K - k0), device="cuda", generator=g) * 2 - 1
    return probe_a, probe_w
