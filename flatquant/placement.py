"""Where calibration keeps the layer inputs and targets: on the GPU, in pinned CPU memory, or on disk.

Usage:
    where = choose_storage(nbytes=2 * 128 * 2048 * 8192 * 4, device=torch.device("cuda"))
    buf = empty_buffer((128, 2048, 8192), where, device, folder="artifacts/calib/x/buffers")

128 × 2048 tokens of a 70B model are 8.6 GB per tensor in fp32, and calibration holds two (inputs and
targets): they stay on the GPU when both fit in half of its free memory and leave room for training the layer,
else in pinned CPU memory when both fit in half of the free RAM, else in two memory-mapped files. Batches are
copied to the device per step.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

STORAGES = ("auto", "device", "cpu", "disk")


def free_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


# Training one layer (batch 4 × 2048 tokens, bf16 autocast) needs about this many times the layer's float32
# weight bytes on the GPU besides the inputs/targets: measured on the H100 as 15 GiB for a LLaMA-3-8B-shaped
# layer (0.87 GiB in fp32) and 52 GiB for a 70B-shaped one (3.2 GiB): results/gpu/.
WORKSPACE_PER_LAYER_BYTE = 16


def choose_storage(nbytes: int, device: torch.device, requested: str = "auto", workspace: int = 0) -> str:
    """nbytes: inputs + targets together; workspace: what training the layer will need on the device besides
    them (see WORKSPACE_PER_LAYER_BYTE). `requested` other than auto is obeyed (device means CPU on a CPU)."""
    if requested not in STORAGES:
        raise ValueError(f"calib.storage must be one of {STORAGES}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if nbytes < 0.5 * free and nbytes + workspace < 0.9 * free:
            return "device"
    if device.type != "cuda" or nbytes < 0.5 * free_ram():
        return "cpu" if device.type == "cuda" else "device"
    return "disk"


def empty_buffer(shape: tuple[int, ...], where: str, device: torch.device, folder: str | Path | None = None) -> torch.Tensor:
    """An uninitialised float32 tensor of `shape` in the chosen storage."""
    if where == "device":
        return torch.empty(shape, device=device)
    if where == "cpu":
        return torch.empty(shape, pin_memory=torch.cuda.is_available())
    folder = Path(folder or ".cache/buffers")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"activations-{uuid.uuid4().hex[:8]}.f32"
    numel = 1
    for n in shape:
        numel *= n
    buf = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).view(shape)
    path.unlink()  # the mapping stays valid; the file disappears with the process, also after a crash
    return buf


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)
