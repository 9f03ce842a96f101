"""Quantized checkpoints: packed 4-bit weights, scales, zero points, transforms and a JSON quantization config.

Usage:
    export(model, tokenizer, "out/llama3-8b-w4a4kv4", method={"name": "flatquant", ...})
    model, tokenizer = load_quantized("out/llama3-8b-w4a4kv4")       # same perplexity, no custom pickles

Layout of the folder: config.json and the tokenizer (as transformers writes them), quant_config.json (format,
method, bits, the shard names and the sha256 of every other file in the folder), and model-0000k.safetensors
shards. Each decoder layer is stored as its QuantLayer's state_dict (flatquant/quant_layer.py) under
`layers.<i>.`: the norms with the scales folded in, the online transforms' parameters, the LAC clips and, for each
linear, `<group>.linears.<name>.codes`, `.scale`, `.zero` (and `.bias`), or `.weight` where it has no codes.
Codes are stored by `pack_codes`: 4-bit ones two per uint8 in offset binary (nibble = code − qmin, low nibble =
even column; `flatquant.packing.pack_int4_offset`), wider ones unpacked in the narrowest signed integer dtype that
holds them. The W4A4 kernels read two's-complement nibbles instead (`pack_int4_twos`), so this is not their
layout: `QuantLayer.use_kernels` re-packs a loaded layer's codes into it. Everything outside the layers
(embeddings, final norm, head) is stored as is. Nothing is pickled.

load_quantized verifies every checksum and refuses files the manifest does not list, then checks config.json
against the stored tensors (layer count, hidden, intermediate and attention sizes, vocabulary), so an edited or
mismatched config cannot build a model with missing or randomly initialised layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from flatquant.adapters import INPUT_GROUP, adapter_for
from flatquant.methods import get_method
from flatquant.quant_layer import QuantLayer
from flatquant.spec import QuantConfig

# v3: each layer is a QuantLayer's state_dict (linear groups); v2 (w_<name>.codes beside the calibration layer's
# state) was written before flatquant/quant_layer.py existed and is refused with a request to export again
FORMAT = "flatquant-checkpoint-v3"
MANIFEST = "quant_config.json"
SHARD_BYTES = 2 * 1024**3


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _layer_tensors(i: int, layer: QuantLayer) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.{k}": v for k, v in layer.state_dict().items()}


def export(model, tokenizer, path: str | Path, method: dict) -> Path:
    """Write the quantized `model` (every decoder layer a QuantLayer, not swapped for the kernels) to the folder
    `path`."""
    from safetensors.torch import save_file

    adapter, path = adapter_for(model), Path(path)
    layers = adapter.layers(model)
    if not all(isinstance(layer, QuantLayer) for layer in layers):
        raise ValueError("export needs a quantized model: every decoder layer a QuantLayer (flatquant.quant_layer)")
    if any(layer.on_kernels for layer in layers):
        raise ValueError("export the model before use_kernels(): the kernels hold their own weight layout")
    path.mkdir(parents=True, exist_ok=True)
    prefix = adapter.layers_path + "."
    tensors = {f"base.{k}": v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    for i, layer in enumerate(layers):
        tensors.update(_layer_tensors(i, layer))
    shards, current, size = [], {}, 0
    for key, value in tensors.items():
        value = value.detach().cpu().clone().contiguous()  # a copy: tied weights must not share storage
        if size and size + value.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key], size = value, size + value.nbytes
    shards.append(current)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, path / name, metadata={"format": FORMAT})
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {"format": FORMAT, "method": method, "quant": asdict(layers[0].qcfg), "num_layers": len(layers),
            "shards": names, "sha256": {name: _sha256(path / name) for name in _folder_files(path)}}
    (path / MANIFEST).write_text(json.dumps(meta, indent=1))
    return path


def _folder_files(path: Path) -> list[str]:
    """Every file under the checkpoint folder but the manifest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _read_checked(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """quant_config.json and all tensors, after checking the format and the checksum of every file in the folder."""
    from safetensors.torch import load_file

    meta_file = path / MANIFEST
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not a quantized checkpoint: {MANIFEST} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r} (in {MANIFEST}), but this version reads "
                         f"only {FORMAT!r}; export the model again with this version")
    digests = meta.get("sha256", {})
    unlisted = [name for name in _folder_files(path) if name not in digests]
    if unlisted:
        raise ValueError(f"{path}: {unlisted} not covered by the checksums in {MANIFEST} (added after export?)")
    for name, digest in digests.items():
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: {name} is missing (listed in {MANIFEST})")
        if _sha256(path / name) != digest:
            raise ValueError(f"{path}: {name} does not match its sha256 in {MANIFEST} (truncated or tampered)")
    unchecked = [name for name in meta["shards"] if name not in digests]
    if unchecked:
        raise ValueError(f"{path}: shards {unchecked} have no sha256 in {MANIFEST}")
    tensors = {}
    for name in meta["shards"]:
        tensors.update(load_file(path / name))
    return meta, tensors


def _rows(tensors: dict, i: int, name: str) -> int | None:
    """Output features of linear `name` in stored layer i (from its scale when quantized); None when absent."""
    key = f"layers.{i}.{INPUT_GROUP[name]}.linears.{name}"
    found = tensors.get(key + ".scale", tensors.get(key + ".weight"))
    return None if found is None else found.shape[0]


def _check_config(path: Path, config, meta: dict, tensors: dict) -> None:
    """Refuse a config.json (or manifest) that does not describe the stored tensors: a ValueError naming the file,
    each wrong field and both values. One mismatch per field is reported, at the first layer that shows it."""
    stored = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.")})
    if stored != list(range(len(stored))):
        raise ValueError(f"{path}: the shards hold decoder layers {stored}, not 0..{len(stored) - 1} (incomplete export?)")
    if meta["num_layers"] != len(stored):
        raise ValueError(f"{path}/{MANIFEST}: num_layers={meta['num_layers']} but the shards hold {len(stored)} decoder layers")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    expected = {"num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                "num_attention_heads × head_dim": heads * head_dim, "num_key_value_heads × head_dim": kv_heads * head_dim}
    found = [("num_hidden_layers", len(stored), "decoder layers in the shards")]
    embed = tensors.get(f"base.{adapter_for(config).embed_path}.weight")
    if embed is not None:
        found += [("vocab_size", embed.shape[0], "rows of the embedding"), ("hidden_size", embed.shape[1], "columns of the embedding")]
    for i in stored:
        found += [("hidden_size", tensors[f"layers.{i}.norm1"].shape[0], f"layer {i}'s input norm"),
                  ("intermediate_size", _rows(tensors, i, "up"), f"layer {i}'s up_proj rows"),
                  ("num_attention_heads × head_dim", _rows(tensors, i, "q"), f"layer {i}'s q_proj rows"),
                  ("num_key_value_heads × head_dim", _rows(tensors, i, "k"), f"layer {i}'s k_proj rows")]
    wrong = {}
    for field, have, what in found:
        if have is not None and have != expected[field]:
            wrong.setdefault(field, f"{field}={expected[field]} but the checkpoint has {have} ({what})")
    if wrong:
        raise ValueError(f"{path}/config.json does not match the stored tensors: " + "; ".join(wrong.values()))


def _layer_state(i: int, tensors: dict) -> dict[str, torch.Tensor]:
    prefix = f"layers.{i}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_quantized(path: str | Path, device="cpu", expect_method: str | None = None, expect_quant: dict | None = None):
    """Rebuild (model, tokenizer) from an exported folder: QuantLayers with the exact stored weights, kept as integer
    codes as calibration left them; call `layer.use_kernels()` on each to run them in real W4A4.

    expect_method / expect_quant: refuse a checkpoint of another method or bit width (ValueError naming both).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta, tensors = _read_checked(path)
    if expect_method and meta["method"]["name"] != expect_method:
        raise ValueError(f"{path} holds a {meta['method']['name']} checkpoint, not {expect_method}")
    for key, value in (expect_quant or {}).items():
        if meta["quant"].get(key) != value:
            raise ValueError(f"{path} has quant.{key}={meta['quant'].get(key)!r}, expected {value!r}")
    config = AutoConfig.from_pretrained(path)
    _check_config(path, config, meta, tensors)
    base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
    # the embeddings, final norm and head in the dtype they were exported in (fp16 from a GPU run), as the model was
    floats = [v.dtype for v in base.values() if v.is_floating_point()]
    model = AutoModelForCausalLM.from_config(config, dtype=floats[0] if floats else torch.float32)
    missing = [k for k in model.state_dict() if k not in base and not k.startswith(adapter_for(model).layers_path + ".")]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:3]}… (truncated export?)")
    model.load_state_dict(base, strict=False)
    qcfg = QuantConfig(**meta["quant"])
    options = {k: v for k, v in meta["method"].items() if k != "name"}
    method, adapter = get_method(meta["method"]["name"], **options), adapter_for(model)
    layers = adapter.layers(model)
    for i in range(meta["num_layers"]):
        parts = adapter.parts(layers[i], model.config)
        stats = {slot: torch.ones(lin.weight.shape[1]) for slot, lin in parts.slot_inputs().items()}  # overwritten on load
        transforms = method.transforms(parts, stats, torch.Generator().manual_seed(0))
        # frozen on the device it runs on, as the run froze them (QuantLayer.from_state; one H200, a 1-epoch fp16
        # model: frozen on the CPU, 540 matrices differed and perplexity was 97.77 against the run's 100.37; frozen on
        # the GPU, every tensor and logit was equal)
        layers[i] = QuantLayer.from_state(parts, qcfg, transforms, _layer_state(i, tensors), device)
    model.config.use_cache = False
    model.to(device).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)
