"""Text for calibration and perplexity: local files first, Hugging Face datasets for users with a hub.

Usage:
    ids = load_tokens(tokenizer, "wikitext2", "test")               # 1-D LongTensor, cached on disk
    windows = eval_windows(ids, seqlen=2048)                         # (n, 2048) non-overlapping
    calib = calib_samples(load_tokens(tok, "wikitext2", "valid"), nsamples=128, seqlen=2048, seed=0)

Joining rule (`join`), the same for every method:
- "hf" (default): the dataset's rows as the Hugging Face dataset holds them — one row per line of the raw
  file, a blank line (only whitespace) being an empty row — joined with "\n\n", as the GPTQ / QuaRot /
  FlatQuant code joins them, so that perplexities compare with published tables (WikiText-2 test: 304,986
  tokens with the SmolLM2 tokenizer);
- "raw": the raw file read whole (hub rows joined with "", which rebuilds the same text; 303,415 tokens).
The local data root is $FLATQUANT_DATA, by default ../shared/data beside the repository.
WikiText-2 train is not shipped here, so the default calibrates on the validation split (see README).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class TextSource:
    """Where one dataset split lives: a file under the data root, or a hub dataset (id, config, split)."""

    local: str | None
    hub: tuple[str, str | None, str, str] | None  # (dataset id, config name, split, text field)


DATASETS: dict[str, dict[str, TextSource]] = {
    "wikitext2": {
        "train": TextSource("wikitext-2-raw-v1/wiki.train.raw", ("wikitext", "wikitext-2-raw-v1", "train", "text")),
        "valid": TextSource("wikitext-2-raw-v1/wiki.valid.raw", ("wikitext", "wikitext-2-raw-v1", "validation", "text")),
        "test": TextSource("wikitext-2-raw-v1/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
    },
    "c4": {  # C4's evaluation text is the first validation shard (en), as in GPTQ / QuaRot / FlatQuant
        "test": TextSource("c4/c4-validation.00000-of-00008.json.gz", None),
    },
}
EVAL_WINDOW_CAP = {"c4": 256}  # the papers evaluate C4 on its first 256 × 2048 tokens


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("FLATQUANT_DATA") or DEFAULT_ROOT)


JOINS = ("hf", "raw")
DEFAULT_JOIN = "hf"


def check_join(join: str) -> None:
    if join not in JOINS:
        raise ValueError(f"data.join must be one of {list(JOINS)}, got {join!r}")


def join_rows(rows: list[str], join: str) -> str:
    """Rows of a dataset (each line of a raw file, newline kept) as one text by the joining rule `join`."""
    check_join(join)
    return "\n\n".join("" if not r.strip() else r for r in rows) if join == "hf" else "".join(rows)


def read_text(name: str, split: str, root=None, join: str = DEFAULT_JOIN) -> str:
    """The text of one split: a local file if present, else a file path given as `name`, else the hub;
    rows joined by the rule `join` (module docstring)."""
    check_join(join)
    if os.path.isfile(name):  # a text file of the user's own: read whole, it has no rows to rebuild
        return Path(name).read_text(encoding="utf-8")
    if name not in DATASETS or split not in DATASETS[name]:
        known = {k: sorted(v) for k, v in DATASETS.items()}
        raise ValueError(f"unknown dataset/split {name!r}/{split!r}; known: {known}, or a path to a text file")
    src = DATASETS[name][split]
    path = data_root(root) / src.local if src.local else None
    if path is not None and path.exists():
        return _read_local(path, join)
    if src.hub is None:
        raise FileNotFoundError(f"{name}/{split}: {path} not found and no hub source is defined")
    try:
        import datasets

        ds = datasets.load_dataset(src.hub[0], src.hub[1], split=src.hub[2])
    except Exception as e:  # offline machines end here
        raise FileNotFoundError(
            f"{name}/{split}: no local file at {path} (set FLATQUANT_DATA) and the hub failed: {e}"
        ) from e
    return join_rows(list(ds[src.hub[3]]), join)


def _read_local(path: Path, join: str) -> str:
    if path.name.endswith(".json.gz"):  # C4 shards: one JSON document per line, joined with "\n\n"
        import gzip
        import json

        with gzip.open(path, "rt", encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f)
    return join_rows(_lines(path.read_text(encoding="utf-8")), join)


def _lines(text: str) -> list[str]:
    """The lines of a text, each with its "\n" (split on "\n" only, as a file is iterated)."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    probe = "".join(sorted(vocab)[:: max(1, len(vocab) // 512)])
    return f"{type(tokenizer).__name__}:{len(vocab)}:{probe}"


def load_tokens(tokenizer, name: str, split: str, root=None, cache_dir: str | os.PathLike | None = ".cache/tokens",
                join: str = DEFAULT_JOIN):
    """Token ids of a whole split as a 1-D LongTensor, cached by (tokenizer, dataset, split, text hash)."""
    text = read_text(name, split, root, join)
    key = hashlib.sha256(f"{_tokenizer_key(tokenizer)}|{name}|{split}|".encode() + text.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{Path(name).stem}-{split}-{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs (a parallel sweep) never share one
        torch.save(ids, tmp)
        tmp.replace(path)
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) from the start of the text; the tail shorter than one is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def calib_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples random windows (nsamples, seqlen), seeded, as the GPTQ / FlatQuant loaders draw them."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
