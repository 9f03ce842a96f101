"""What the stages of one run share: the validated config pieces, the model, the token caches.

Built once per run from the composed Hydra config (a plain dict here, so nothing below needs Hydra).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch

from flatquant import data
from flatquant.calibrate import CalibConfig, split_layers
from flatquant.adapters import adapter_for
from flatquant.quant_layer import QuantLayer, kernel_unsupported
from flatquant.methods import check_model, get_method
from flatquant.model import load_model, resolve_path
from flatquant.lazy import load_lazy
from flatquant.offload import LayerOffload, model_bytes
from flatquant.spec import QuantConfig

CALIB_DATA_KEYS = ("calib_dataset", "calib_split", "join")  # the data settings that decide calibration samples
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or device=auto")
    return name


def _int(cfg: dict, key: str, low: int, allowed: str, none_ok: bool = False) -> None:
    """cfg's dotted `key` must be an integer >= low (or null where none_ok); else a ValueError naming it."""
    group, _, name = key.rpartition(".")
    value = cfg[group][name] if group else cfg[name]
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def check_tracking_uri(uri) -> None:
    if uri is None or str(uri).startswith(("sqlite:///", "http://", "https://", "databricks")):
        return
    raise ValueError(f"tracking.uri must be sqlite:///<path to a .db file>, http(s)://<host>:<port> of an MLflow server "
                     f"or null (the project's mlflow.db), got {uri!r}"
                     + ("; a plain folder is MLflow's deprecated file store: use sqlite:///<folder>/mlflow.db"
                        if "://" not in str(uri) else ""))


def validate(cfg: dict) -> None:
    """The checks on the groups the core does not validate itself, before anything is loaded or opened: each error
    names the key, the value and what is allowed."""
    _int(cfg, "seed", 0, "a non-negative integer")
    _int(cfg, "eval.seqlen", 2, "an integer >= 2 (tokens per perplexity window)")
    _int(cfg, "eval.batch_size", 1, "a positive integer")
    _int(cfg, "eval.max_windows", 1, "a positive integer, or null for every window", none_ok=True)
    _int(cfg, "eval.qa_batch_size", 1, "a positive integer")
    _int(cfg, "eval.qa_limit", 1, "a positive integer, or null for every item", none_ok=True)
    _int(cfg, "calib.nsamples", 1, "a positive integer (calibration windows)")
    _int(cfg, "calib.seqlen", 2, "an integer >= 2 (tokens per calibration window)")
    c = cfg["calib"]
    if c.get("workers", 1) != 1 or c.get("worker", 0) != 0:
        _int(cfg, "calib.workers", 1, "a positive integer (processes that share one calibration)")
        _int(cfg, "calib.worker", 0, "an integer in 0..calib.workers-1")
        if c["worker"] >= c["workers"]:
            raise ValueError(f"calib.worker must be in 0..{c['workers'] - 1} (calib.workers={c['workers']}), got {c['worker']}")
        if c.get("layers") is not None:
            raise ValueError("calib.layers and calib.workers both choose the layers: set one of them")
    if c.get("layers") is not None:
        parse_layers(c["layers"])
    data.check_join(cfg["data"].get("join", data.DEFAULT_JOIN))
    check_tracking_uri(cfg["tracking"]["uri"])


# Settings that change where or by which process a thing is made, not what it is: never part of a key. For model:
# where the GGUF cache is, the shape stage=bench times; for calib: where the layer inputs are kept, whether
# baselines' layer MSE is measured, which process trains which layers.
UNKEYED = {"model": ("gguf_cache", "shape"), "calib": ("storage", "layer_mse", "layers", "workers", "worker")}


def parse_layers(text) -> tuple[int, int]:
    """calib.layers "START:END" → (START, END), a half-open range of decoder layers."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
        raise ValueError(f"calib.layers must be START:END with 0 <= START < END (e.g. 0:15), got {text!r}")
    return int(parts[0]), int(parts[1])


class Context:
    """Lazily loads what a stage asks for; validates every config group on construction."""

    def __init__(self, cfg: dict, tracker=None):
        validate(cfg)
        self.cfg, self.tracker = cfg, tracker
        self.device = pick_device(str(cfg["device"]))
        self.qcfg = QuantConfig.from_dict(dict(cfg["quant"]))
        options = {k: v for k, v in cfg["method"].items() if k != "name"}
        self.method = get_method(cfg["method"]["name"], **options)
        self.ccfg = CalibConfig.from_group(cfg["calib"], cfg["gptq"], seed=cfg["seed"], device=self.device, wquant=cfg["wquant"])
        if cfg["stage"] != "bench":  # the benchmark needs only the model's shapes
            resolve_path(cfg["model"]["path"], cfg["model"].get("gguf_file"))  # a bad path fails before any run opens
        dtype = cfg["model"]["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype] if self.device != "cpu" else torch.float32
        offload, kernels = cfg.get("offload", "auto"), cfg.get("kernels", False)
        if offload not in ("auto", True, False, "disk"):
            raise ValueError(f"offload must be auto, true, false or disk, got {offload!r}")
        if kernels not in (True, False):
            raise ValueError(f"kernels must be true or false, got {kernels!r}")
        if kernels and not self.device.startswith("cuda"):
            raise ValueError("kernels=true runs the W4A4 Triton kernels, which need a CUDA GPU (device=cuda)")
        if kernels and (not self.method.quantizes or kernel_unsupported(self.qcfg)):
            why = kernel_unsupported(self.qcfg) or f"method {self.method.name} does not quantize"
            raise ValueError(f"kernels=true: {why}")
        if kernels and dtype == "float32":
            raise ValueError("kernels=true needs model.dtype=float16 or bfloat16 (the kernels read 16-bit activations)")
        self.offload: LayerOffload | None = None
        self.layer_series: dict[str, list[float]] = {}  # per-layer calibration series, for the metrics JSON

    @cached_property
    def loaded(self):
        """(model, tokenizer), loaded into CPU memory first; the whole model then moves to the device, or,
        when it would not fit (offload=auto) or offload=true, only its embeddings and head do and the decoder
        layers stream through the GPU one at a time (flatquant.offload)."""
        m = self.cfg["model"]
        if self.cfg.get("offload") == "disk":  # decoder layers stay in their safetensors files until used
            folder, gguf = resolve_path(m["path"], m.get("gguf_file"))
            if gguf or not Path(folder).is_dir():
                raise ValueError(f"offload=disk reads a local safetensors checkpoint folder; model.path={m['path']!r} is not one")
            model, tokenizer = load_lazy(folder, self.dtype)
        else:
            model, tokenizer = load_model(m["path"], m.get("gguf_file"), self.dtype, "cpu", m.get("gguf_cache"))
        adapter_for(model)  # an unsupported architecture fails here, before any evaluation
        check_model(self.method, model.config)  # so does a size the method's transforms cannot factor
        if self.wants_offload(model_bytes(model)):
            self.offload = LayerOffload(model, self.device)
        else:
            model.to(self.device)
        return model, tokenizer

    def wants_offload(self, nbytes: int) -> bool:
        offload = self.cfg.get("offload", "auto")
        if offload == "disk":  # the layers are on the meta device: they can only be streamed
            return True
        if not self.device.startswith("cuda") or offload is False:
            return False
        return offload is True or nbytes > 0.8 * torch.cuda.mem_get_info(torch.device(self.device))[0]

    def restream(self) -> None:
        """After calibration replaced the layers: stream the new ones (offloading only)."""
        if self.offload is not None:
            self.offload.remove()
            self.offload = LayerOffload(self.model, self.device)

    def eval_model(self):
        """The model for evaluation: with kernels=true its quantized layers run on the W4A4 kernels."""
        model = self.model
        if self.cfg.get("kernels", False):
            layers = adapter_for(model).layers(model)
            todo = [layer for layer in layers if isinstance(layer, QuantLayer) and not layer.on_kernels]
            for layer in todo:
                layer.use_kernels()
            if todo:
                self.restream()
        return model

    @property
    def model(self):
        return self.loaded[0]

    @property
    def tokenizer(self):
        return self.loaded[1]

    def tokens(self, name: str, split: str) -> torch.Tensor:
        d = self.cfg["data"]
        return data.load_tokens(self.tokenizer, name, split, d.get("root"), d.get("cache_dir"), d.get("join", data.DEFAULT_JOIN))

    @property
    def layer_range(self) -> tuple[int, int] | None:
        """The decoder layers this process calibrates when one calibration is split over processes (calib.layers,
        or worker calib.worker of calib.workers); None when it calibrates the whole model."""
        c = self.cfg["calib"]
        if c.get("layers") is not None:
            return parse_layers(c["layers"])
        if c.get("workers", 1) > 1:
            return split_layers(self.model.config.num_hidden_layers, c["workers"], c.get("worker", 0))
        return None

    def calib_samples(self) -> torch.Tensor:
        d, c = self.cfg["data"], self.cfg["calib"]
        ids = self.tokens(d["calib_dataset"], d["calib_split"])
        return data.calib_samples(ids, c["nsamples"], c["seqlen"], self.cfg["seed"])

    def key(self, *groups: str, **extra) -> str:
        """Hash of the config groups that decide an artifact (so a changed config never reuses it)."""
        picked = {g: {k: v for k, v in self.cfg[g].items() if k not in UNKEYED.get(g, ())} if isinstance(self.cfg[g], dict)
                  else self.cfg[g] for g in groups}
        blob = json.dumps(picked | {"seed": self.cfg["seed"]} | extra, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def calib_dir(self) -> Path:
        """The calibration store: keyed by what decides the learned transforms and clip factors only. Not by the
        weight quantizer (RTN or GPTQ is applied when a layer is merged, after training), nor by evaluation
        settings, kernels, offloading or where the layer inputs are kept: `-m wquant=rtn,gptq` trains once."""
        d = self.cfg["data"]
        calib_data = {k: d.get(k, data.DEFAULT_JOIN if k == "join" else None) for k in CALIB_DATA_KEYS}
        key = self.key("model", "method", "quant", "calib", data=calib_data)
        return Path(self.cfg["artifacts_dir"]) / "calib" / f"{self.cfg['model']['name']}_{self.method.name}_{self.qcfg.tag}_{key}"

    @property
    def quantized_dir(self) -> Path:
        """Where export writes the quantized checkpoint: the calibration's name plus the weight quantizer."""
        wq = self.cfg["wquant"] if self.cfg["wquant"] == "rtn" else f"gptq_{self.key('gptq')}"
        return Path(self.cfg["artifacts_dir"]) / "quantized" / f"{self.calib_dir.name}_{wq}"
