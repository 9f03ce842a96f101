"""Pin this process to one GPU: for sweeps that run one job per GPU in worker processes (Hydra's joblib launcher).

    from pipeline.gpu import claim_gpu
    claim_gpu()          # before anything touches CUDA; returns the GPU id, or None where there is nothing to pin

Why a lock and not `job.num % n_gpus`: CUDA reads CUDA_VISIBLE_DEVICES once, when the process first initialises it,
and joblib's loky workers live across jobs, so a worker must claim one GPU on its first job and keep it; and with jobs
of different lengths, job k + n_gpus may start while job k still holds GPU k % n_gpus. A claim is an exclusive flock
on <lock_dir>/gpu<id>.lock that the OS releases when the worker exits, so two workers (or two sweeps on one host)
never share a GPU. The GPUs are FLATQUANT_GPUS or CUDA_VISIBLE_DEVICES ("0,1,5"), else every GPU nvidia-smi lists.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
_held: tuple[str, object] | None = None  # (GPU id, open lock file), kept for the life of the process


def visible_gpus() -> list[str]:
    """GPU ids this process may use, found without initialising CUDA (which would freeze the visible set)."""
    env = os.environ.get("FLATQUANT_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # nvidia-smi numbers GPUs in PCI bus order
    return out.split()


def jobs_per_gpu() -> int:
    """FLATQUANT_JOBS_PER_GPU (default 1): how many workers may share one GPU, for models far smaller than it."""
    n = os.environ.get("FLATQUANT_JOBS_PER_GPU", "1")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"FLATQUANT_JOBS_PER_GPU must be a positive integer, got {n!r}")
    return int(n)


def claim_gpu(lock_dir: str | Path | None = None, wait_s: float = 3600.0) -> str | None:
    """Claim a free GPU for this process and set CUDA_VISIBLE_DEVICES to it; waits while all are taken."""
    global _held
    if _held is not None:
        return _held[0]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA is already initialised in this process: cannot pin it to one GPU")
        return None
    gpus = visible_gpus()
    if not gpus:
        return None
    lock_dir = Path(lock_dir or os.environ.get("FLATQUANT_GPU_LOCKS") or Path(tempfile.gettempdir()) / "flatquant-gpus")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for slot, gpu in ((slot, gpu) for slot in range(jobs_per_gpu()) for gpu in gpus):
            f = open(lock_dir / (f"gpu{gpu}.lock" if slot == 0 else f"gpu{gpu}.{slot}.lock"), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            _held = (gpu, f)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("process %d pinned to GPU %s (lock %s)", os.getpid(), gpu, f.name)
            return gpu
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {gpus} after {wait_s:.0f} s (locks in {lock_dir})")
        time.sleep(2.0)
