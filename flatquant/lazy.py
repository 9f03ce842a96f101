"""Decoder layers left in their safetensors files until needed, so a model larger than the RAM can run.

Usage:
    model, tok = load_lazy("/models/Meta-Llama-3-70B", torch.bfloat16)   # layers on the meta device
    materialize(layer)        # read one layer's tensors from disk into CPU memory (calibration does this)
    LayerOffload(model, "cuda")   # streams lazy layers from disk, materialized ones from pinned memory

Only the embeddings, final norm, head and rotary embedding are read at load time (4 GiB for LLaMA-3-70B, against
131 GiB for the whole model). A lazy layer's parameters live on the meta device; `layer_tensors` reads them from the
memory-mapped files (the OS page cache keeps recently read layers), and `materialize` makes them real CPU tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flatquant.adapters import adapter_for


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from the sharded index or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder}: offload=disk reads safetensors checkpoints (model.safetensors or an index); none found")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _read(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        with safe_open(path, "pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def is_lazy(module: nn.Module) -> bool:
    return getattr(module, "_lazy_source", None) is not None


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A lazy layer's state_dict read from disk (CPU tensors in the model's dtype)."""
    files, prefix, dtype = layer._lazy_source
    names = [prefix + k for k in layer.state_dict()]
    return {k[len(prefix):]: v for k, v in _read(files, names, dtype).items()}


def materialize(layer: nn.Module) -> nn.Module:
    """Give a lazy layer its real tensors (CPU); a no-op for an ordinary layer."""
    if not is_lazy(layer):
        return layer
    state = layer_tensors(layer)
    layer.to_empty(device="cpu")
    layer.load_state_dict(state, strict=True)
    layer._lazy_source = None
    return layer


def load_lazy(folder: str | Path, dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer) with every decoder layer lazy; everything else read into CPU memory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from flatquant.model import check_tokenizer

    folder = Path(folder)
    files = _weight_map(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    prefix = adapter.layers_path + "."
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    present = [k for k in rest if k in files]
    state = _read(files, present, dtype)
    missing = [k for k in rest if k not in files]
    if any("embed" in k for k in missing):
        raise ValueError(f"{folder}: the checkpoint lacks {missing}")
    layers = adapter.layers(model)
    kept = list(layers)
    for i in range(len(layers)):  # only the modules outside the layers get real storage
        layers[i] = nn.Identity()
    model.to_empty(device="cpu")
    for i, layer in enumerate(kept):
        layers[i] = layer
    model.load_state_dict(state, strict=False)
    if missing:  # a tied head (lm_head.weight absent from the file) shares the embedding
        model.tie_weights()
        still = [k for k in missing if k.startswith("lm_head") and model.get_output_embeddings().weight.data_ptr()
                 != model.get_input_embeddings().weight.data_ptr()]
        if still:
            raise ValueError(f"{folder}: the checkpoint lacks {still}")
    rotary = adapter.rotary(model)
    adapter_parent, _, name = adapter.rotary_path.rpartition(".")
    model.get_submodule(adapter_parent).register_module(name, type(rotary)(config=model.config))  # fresh buffers
    for i, layer in enumerate(layers):
        layer._lazy_source = (files, f"{prefix}{i}.", dtype)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer, model.config, str(folder))
    return model, tokenizer
