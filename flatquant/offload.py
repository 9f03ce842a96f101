"""Run a model whose decoder layers stay in CPU memory on one GPU, one layer at a time.

Usage:
    off = LayerOffload(model, "cuda")     # embeddings, final norm, head and rotary move to the GPU
    logits = model(ids.cuda()).logits      # each layer is copied in for its forward, then dropped
    off.remove()                           # hooks off; the layers stay in CPU memory

Each layer's tensors are pinned once, so copies run asynchronously: while layer i computes, layer i+1
is copied on a side stream (after the last layer, layer 0 for the next batch). Layers loaded lazily
(flatquant.lazy, offload=disk) are read from their safetensors files instead, each time they are needed. At most two layers are
on the GPU at a time, so a 70B model in bf16 (≈ 1.7 GB per layer, ≈ 4 GB of embeddings and head) runs in
a few GB of GPU memory; the CPU copy is never modified, so nothing is copied back. The price is one
host-to-device copy of the whole model per forward: use large batches (many windows per forward).
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from flatquant.adapters import adapter_for
from flatquant.lazy import is_lazy, layer_tensors


def _tensor_slots(module: nn.Module):
    """(store, key, is_param, qualified name) for every parameter and buffer of `module` and its children."""
    for prefix, m in module.named_modules():
        for key, t in m._parameters.items():
            if t is not None:
                yield m._parameters, key, True, f"{prefix}.{key}" if prefix else key
        for key, t in m._buffers.items():
            if t is not None:
                yield m._buffers, key, False, f"{prefix}.{key}" if prefix else key


def _assign(store: dict, key: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param and (store[key].is_meta == value.is_meta):
        store[key].data = value
    elif is_param:  # to or from the meta device (a lazy layer): .data cannot cross it, the Parameter is replaced
        store[key] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        store[key] = value


def model_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in chain(model.parameters(), model.buffers()))


class LayerOffload:
    """Streams the decoder layers of `model` (left on the CPU) through `device` during forward passes."""

    def __init__(self, model: nn.Module, device, pin: bool | None = None, prefetch: bool = True):
        self.device = torch.device(device)
        self.layers = list(adapter_for(model).layers(model))
        cuda = self.device.type == "cuda"
        pin = cuda if pin is None else pin
        in_layers = {id(t) for layer in self.layers for t in chain(layer.parameters(), layer.buffers())}
        for store, key, is_param, _ in _tensor_slots(model):  # everything outside the layers lives on the device
            if id(store[key]) not in in_layers:
                _assign(store, key, is_param, store[key].data.to(self.device))
        self.slots: list[list[tuple[dict, str, bool, str, torch.Tensor]]] = []
        for layer in self.layers:
            slots = []
            for store, key, is_param, name in _tensor_slots(layer):
                home = store[key].data
                if not is_lazy(layer):  # a lazy layer stays on the meta device and is read from disk per use
                    home = home.to("cpu")
                    if pin and not home.is_pinned():
                        home = home.pin_memory()
                    _assign(store, key, is_param, home)
                slots.append((store, key, is_param, name, home))
            self.slots.append(slots)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.prefetch = prefetch
        self.loaded: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.copies = 0  # layers copied to the device so far (tests and logs)
        self.handles = []
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._before(i)))
            self.handles.append(layer.register_forward_hook(self._after(i)))

    def _load(self, i: int) -> None:
        """Start copying layer i to the device (on the side stream when there is one)."""
        if i in self.loaded:
            return
        layer = self.layers[i]
        if is_lazy(layer):
            read = layer_tensors(layer)
            sources = [read[name] for *_, name, _ in self.slots[i]]
        else:
            sources = [home for *_, home in self.slots[i]]
        if self.stream is None:
            self.loaded[i] = ([t.to(self.device) for t in sources], None)
        else:
            with torch.cuda.stream(self.stream):
                copies = [t.to(self.device, non_blocking=True) for t in sources]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.loaded[i] = (copies, event)
        self.copies += 1

    def _before(self, i: int):
        def hook(module, args):
            self._load(i)
            tensors, event = self.loaded[i]
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in tensors:
                    t.record_stream(current)  # the allocator must not reuse them before this layer is done
            for (store, key, is_param, *_), t in zip(self.slots[i], tensors):
                _assign(store, key, is_param, t)

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            for store, key, is_param, _, home in self.slots[i]:
                _assign(store, key, is_param, home)
            self.loaded.pop(i, None)
            if self.prefetch and len(self.layers) > 1:  # while the GPU still runs layer i's kernels
                self._load((i + 1) % len(self.layers))

        return hook

    def remove(self) -> None:
        """Detach the hooks; every layer is left on the CPU (the pinned copies)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.loaded.clear()
