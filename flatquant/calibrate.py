"""Block-wise calibration: each decoder layer learns its transforms on its own full-precision inputs.

Usage:
    report = quantize_model(model, samples, get_method("flatquant"), QuantConfig(), CalibConfig(),
                            ckpt_dir="artifacts/calib/<key>", on_layer=print)

For layer i: the full-precision layer maps its inputs X_i to targets Y_i (and activation statistics for
the diagonal-scale start are taken on the way); a CalibLayer is built around the same weights,
its transform and clip parameters are trained to minimise MSE(Y_i, layer_q(X_i)) (paper §3.3: AdamW,
cosine decay, clip factors at 10× the learning rate), then converted (flatquant.convert: merged, weights
quantized by RTN or GPTQ, packed) and the QuantLayer swapped into the model, and
X_{i+1} = Y_i. Only the layer being calibrated is on the GPU: a model whose layers are in CPU memory
(flatquant.offload) gets each quantized layer back there, its weights packed to 4-bit codes. Each finished layer's parameters are saved at once (safetensors + manifest), so a killed
run resumes at the next layer; a NaN loss retries the layer at a tenth of the learning rate, then falls
back to the untrained start, and the report records which layers did so.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from flatquant.adapters import adapter_for
from flatquant.convert import GPTQOptions, convert
from flatquant.layer import CalibLayer
from flatquant.lazy import materialize
from flatquant.placement import STORAGES, WORKSPACE_PER_LAYER_BYTE, choose_storage, empty_buffer, to_device
from flatquant.spec import QuantConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibConfig:
    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    storage: str = "auto"  # layer inputs/targets: auto | device | cpu | disk (flatquant.placement)
    wquant: str = "rtn"
    gptq_blocksize: int = 128
    gptq_percdamp: float = 0.01
    gptq_act_order: bool = False
    layer_mse: bool = False  # also measure every layer's output MSE for methods that do not train (costs FP passes)

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"calibration needs epochs >= 0, batch_size >= 1, lr > 0; got {self}")
        if self.storage not in STORAGES:
            raise ValueError(f"calib.storage must be one of {STORAGES}, got {self.storage!r}")
        if self.wquant not in ("rtn", "gptq"):
            raise ValueError(f"wquant must be rtn or gptq, got {self.wquant!r}")

    # keys of a calib config group that choose the samples and which process trains which layers: read by the
    # pipeline (samples, split), never by the training of a layer
    SAMPLE_AND_SPLIT_KEYS = ("nsamples", "seqlen", "layers", "workers", "worker")

    @classmethod
    def from_group(cls, calib: dict, gptq: dict | None = None, **run) -> "CalibConfig":
        """From a config's calib group (and its gptq group, as gptq_<key>), with run-level fields (seed, device,
        wquant) given by name; keys the group may hold for the pipeline (SAMPLE_AND_SPLIT_KEYS) are left out, any
        other unknown key is a ValueError naming it."""
        known = {f.name for f in fields(cls)}
        picked = {k: v for k, v in calib.items() if k not in cls.SAMPLE_AND_SPLIT_KEYS}
        picked.update({f"gptq_{k}": v for k, v in (gptq or {}).items()})
        unknown = sorted(set(picked) - known)
        if unknown:
            raise ValueError(f"unknown calib/gptq keys {unknown}; known: {sorted(known - set(run))}")
        return cls(**picked, **run)

    def needs_data(self, method) -> bool:
        """Whether layer inputs must be propagated: training, activation statistics, GPTQ Hessians or layer_mse."""
        return method.trainable or method.needs_stats or self.wquant == "gptq" or self.layer_mse


@dataclass
class LayerReport:
    index: int
    init_loss: float = float("nan")
    final_loss: float = float("nan")
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    fallback: str = ""
    resumed: bool = False


def _layer_io(layer, inps, pe, batch_size, stat_names: dict[str, torch.nn.Module], out: torch.Tensor | None = None):
    """Full-precision outputs of one layer (written into `out` when given) and per-channel max |input|
    of the named linears."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_, args):
            a = args[0].detach().abs().flatten(0, -2).amax(0).float()
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in stat_names.items()]
    try:
        device = pe[0].device
        outs = torch.empty_like(inps) if out is None else out
        with torch.no_grad():
            for i in range(0, len(inps), batch_size):
                outs[i : i + batch_size] = layer(to_device(inps[i : i + batch_size], device), position_embeddings=pe)
    finally:
        for h in handles:
            h.remove()
    return outs, stats


def _param_groups(qlayer: CalibLayer, ccfg: CalibConfig):
    clips = [p for n, p in qlayer.named_parameters() if n.endswith("clip_logit") and p.requires_grad]
    rest = [p for n, p in qlayer.named_parameters() if not n.endswith("clip_logit") and p.requires_grad]
    return [{"params": rest, "lr": ccfg.lr}, {"params": clips, "lr": ccfg.lr * ccfg.clip_lr_mult}]


def layer_mse(qlayer, inps, targets, pe, batch_size) -> float:
    with torch.no_grad():
        total = sum(
            torch.nn.functional.mse_loss(qlayer(to_device(inps[i : i + batch_size], pe[0].device), position_embeddings=pe),
                                         to_device(targets[i : i + batch_size], pe[0].device), reduction="sum").item()
            for i in range(0, len(inps), batch_size)
        )
    return total / targets.numel()


def train_layer(qlayer, inps, targets, pe, ccfg: CalibConfig, lr: float, progress=None) -> list[float]:
    """AdamW + cosine decay over epochs × steps; returns the mean loss of each epoch (NaN stops early)."""
    groups = _param_groups(qlayer, ccfg)
    for g in groups:
        g["lr"] *= lr / ccfg.lr
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    steps = math.ceil(len(inps) / ccfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, ccfg.epochs * steps), eta_min=lr * 1e-3)
    gen = torch.Generator().manual_seed(ccfg.seed)
    device = pe[0].device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=ccfg.amp and device.type == "cuda")
    losses = []
    for _ in range(ccfg.epochs):
        perm, total = torch.randperm(len(inps), generator=gen), torch.zeros((), device=device)
        for s in range(steps):
            idx = perm[s * ccfg.batch_size : (s + 1) * ccfg.batch_size].to(inps.device)
            with autocast:
                out = qlayer(to_device(inps[idx], device), position_embeddings=pe)
            loss = torch.nn.functional.mse_loss(out.float(), to_device(targets[idx], device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()  # summed on the device: no host sync per step
        losses.append(total.item() / steps)
        if not math.isfinite(losses[-1]):  # checked once per epoch; the caller retries or falls back
            return losses
        if progress is not None:
            progress.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses


def trainable_state(qlayer: CalibLayer) -> dict[str, torch.Tensor]:
    """What calibration learned (transforms, their fixed starts, clip logits): enough to rebuild the layer."""
    return {k: v.detach().cpu().contiguous() for k, v in qlayer.state_dict().items() if k.startswith(("transforms.", "wq.", "aq."))}


def config_key(*parts) -> str:
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_key(method, qcfg: QuantConfig, ccfg: CalibConfig, samples: torch.Tensor) -> str:
    """What decides a layer's learned parameters: the method, the quantizers, the training schedule and, where the
    method trains or takes statistics, the samples. Not the weight quantizer (RTN or GPTQ runs at merge time, after
    training), the device or the storage of the layer inputs: one store serves wquant=rtn and wquant=gptq."""
    schedule = {k: v for k, v in asdict(ccfg).items() if k not in ("device", "storage", "layer_mse") and not k.startswith(("wquant", "gptq_"))}
    data = (tuple(samples.shape), int(samples.sum())) if method.trainable or method.needs_stats else None
    return config_key(method, qcfg, schedule, data)


class LayerStore:
    """One safetensors file per finished layer plus manifest.json (config key, checksums, reports)."""

    def __init__(self, root: str | Path | None, key: str):
        self.root, self.key = (Path(root) if root else None), key
        self.manifest = {"key": key, "layers": {}}
        self.last_count = 0  # layers in the store after this process's latest save
        if self.root and (self.root / "manifest.json").exists():
            try:
                found = json.loads((self.root / "manifest.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                log.warning("calibration store %s: manifest.json is unreadable (%s), so none of its layers can be "
                            "verified: every layer will be calibrated again (delete the folder to clear it)", self.root, e)
                found = {"key": key, "layers": {}}
            if found.get("key") != key:
                raise ValueError(f"{self.root} holds layers of another configuration (key {found.get('key')} != {key})")
            self.manifest = found

    def load(self, i: int) -> tuple[dict, dict] | None:
        entry = self.manifest["layers"].get(str(i))
        if not self.root or entry is None:
            return None
        from safetensors.torch import load_file

        path = self.root / entry["file"]
        if not path.exists():
            log.warning("calibration store %s: layer %d is in the manifest but %s is missing: calibrating that layer "
                        "again", self.root, i, path.name)
            del self.manifest["layers"][str(i)]
            return None
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{path} does not match its checksum in the manifest: corrupt or tampered")
        return load_file(path), entry["report"]

    def save(self, i: int, state: dict, report: LayerReport) -> None:
        """Write layer i, then add it to the manifest under a lock (last_count: the layers the store then holds)."""
        if not self.root:
            return
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        name = f"layer_{i:03d}.safetensors"
        tmp = self.root / f"{name}.{os.getpid()}.tmp"  # per process: two runs sharing a store never collide
        save_file(state, tmp)
        tmp.replace(self.root / name)
        digest = hashlib.sha256((self.root / name).read_bytes()).hexdigest()
        with open(self.root / "manifest.lock", "a") as lock:  # workers calibrating other layers of the same store
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_disk()  # their entries, written since this process read the manifest, are kept
            self.manifest["layers"][str(i)] = {"file": name, "sha256": digest, "report": asdict(report)}
            tmp = self.root / f"manifest.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.manifest, indent=1))
            tmp.replace(self.root / "manifest.json")
            self.last_count = len(self.manifest["layers"])

    def _merge_disk(self) -> None:
        try:
            found = json.loads((self.root / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return
        if found.get("key") == self.key:
            self.manifest["layers"] = {**found.get("layers", {}), **self.manifest["layers"]}

    def count(self) -> int:
        """Layers in the store as it is on disk now (other processes may have added some)."""
        if self.root and (self.root / "manifest.json").exists():
            self._merge_disk()
        return len(self.manifest["layers"])


def layer_inputs(model, samples: torch.Tensor, device, out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
    """Embeddings of the samples (layer-0 inputs, written into `out` when given) and the rotary (cos, sin)."""
    adapter = adapter_for(model)
    embed = adapter.embed(model)
    with torch.no_grad():
        if out is None:
            out = embed(samples.to(device)).float()
        else:
            for i in range(len(samples)):
                out[i] = embed(samples[i : i + 1].to(embed.weight.device)).float()[0]
        pos = torch.arange(samples.shape[1], device=device).unsqueeze(0)
        pe = adapter.rotary(model)(to_device(out[:1], device), pos)
    return out, tuple(t.float() for t in pe)


def activation_buffers(model, samples: torch.Tensor, ccfg: CalibConfig, folder=None):
    """Layer-0 inputs, a spare buffer for targets (same storage, see flatquant.placement) and the rotary."""
    device = torch.device(ccfg.device)
    shape = (*samples.shape, model.config.hidden_size)
    layer_bytes = sum(4 * p.numel() for p in adapter_for(model).layers(model)[0].parameters())
    where = choose_storage(2 * 4 * shape[0] * shape[1] * shape[2], device, ccfg.storage, WORKSPACE_PER_LAYER_BYTE * layer_bytes)
    inps, pe = layer_inputs(model, samples, device, empty_buffer(shape, where, device, folder))
    return inps, empty_buffer(shape, where, device, folder), pe


def quantize_model(
    model,
    samples: torch.Tensor,
    method,
    qcfg: QuantConfig,
    ccfg: CalibConfig,
    ckpt_dir: str | Path | None = None,
    on_layer: Callable[[LayerReport, dict], None] | None = None,
) -> list[LayerReport]:
    """Replace every decoder layer of `model` (in place) by its calibrated QuantLayer (flatquant.quant_layer:
    quantized weights kept as integer codes, 4-bit ones two per byte)."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    store = LayerStore(ckpt_dir, store_key(method, qcfg, ccfg, samples))
    device = torch.device(ccfg.device)
    if ccfg.needs_data(method) and samples.numel() == 0:
        raise ValueError(f"method {method.name} with wquant={ccfg.wquant} needs calibration samples")
    inps, spare, pe = activation_buffers(model, samples, ccfg, ckpt_dir) if ccfg.needs_data(method) else (None, None, None)
    reports = []
    bar = tqdm(range(len(layers)), desc=f"calibrate {method.name}", unit="layer")
    for i in bar:
        report, state = _quantize_layer(model, adapter, layers, i, (inps, spare), pe, method, qcfg, ccfg, store, bar)
        if ccfg.needs_data(method):
            inps, spare = state.pop("_targets"), inps  # this layer's targets are the next one's inputs
        reports.append(report)
        if on_layer is not None:
            on_layer(report, state)
    return reports


def split_layers(n_layers: int, workers: int, worker: int) -> tuple[int, int]:
    """Worker `worker` of `workers`: its contiguous share [start, end) of n_layers decoder layers (sizes differ by
    at most one)."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers}: the worker index must be in 0..{workers - 1}")
    return worker * n_layers // workers, (worker + 1) * n_layers // workers


@dataclass
class RangeResult:
    reports: list[LayerReport]
    stored: int          # layers in the store after this process's last save (or as found, if it saved none)
    saved: int           # layers this process trained and saved
    fp_seconds: float    # spent carrying the FP activations through layers 0..start-1: the split's overhead


def calibrate_layers(model, samples: torch.Tensor, method, qcfg: QuantConfig, ccfg: CalibConfig, ckpt_dir: str | Path,
                     start: int, end: int, on_layer: Callable[[LayerReport, dict], None] | None = None) -> RangeResult:
    """Calibrate decoder layers [start, end) into the store at `ckpt_dir`, leaving `model` unchanged: one worker's
    share of a model calibrated in parallel. Layers 0..start-1 only carry the full-precision activations forward
    (the same computation as in a whole-model run, so each stored layer is the one that run would store); layers
    already in the store are not trained again. quantize_model over the whole model then resumes every layer."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if not 0 <= start < end <= len(layers):
        raise ValueError(f"calib.layers={start}:{end}: the model has {len(layers)} decoder layers (0:{len(layers)})")
    store = LayerStore(ckpt_dir, store_key(method, qcfg, ccfg, samples))
    data = ccfg.needs_data(method)
    if data and samples.numel() == 0:
        raise ValueError(f"method {method.name} with wquant={ccfg.wquant} needs calibration samples")
    inps, spare, pe = activation_buffers(model, samples, ccfg, ckpt_dir) if data else (None, None, None)
    device = torch.device(ccfg.device)
    reports, saved, fp_seconds = [], 0, 0.0
    bar = tqdm(range(0 if data else start, end), unit="layer",
               desc=f"calibrate {method.name} layers {start}:{end} of {len(layers)}")
    for i in bar:
        fp = layers[i]
        materialize(fp)
        if i < start:  # full precision only: this layer's outputs are the next one's inputs
            bar.set_postfix_str("FP forward")
            t0 = time.time()
            work = copy.deepcopy(fp).to(device=device, dtype=torch.float32)
            targets, _ = _layer_io(work, inps, pe, ccfg.batch_size, {}, out=spare)
            inps, spare = targets, inps
            del work
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # timed to the end of its kernels
            fp_seconds += time.time() - t0
            continue
        layers[i] = copy.deepcopy(fp)  # _quantize_layer replaces the layer it works on; the model keeps its own
        report, state = _quantize_layer(model, adapter, layers, i, (inps, spare), pe, method, qcfg, ccfg, store, bar,
                                        convert_layer=False)
        layers[i] = fp
        saved += not report.resumed
        if data:
            inps, spare = state.pop("_targets"), inps
        reports.append(report)
        if on_layer is not None:
            on_layer(report, state)
    return RangeResult(reports, store.last_count if saved else store.count(), saved, fp_seconds)


def _quantize_layer(model, adapter, layers, i, buffers, pe, method, qcfg, ccfg, store, bar, convert_layer=True):
    t0 = time.time()
    inps, spare = buffers
    device = torch.device(ccfg.device)
    materialize(layers[i])  # a layer still on disk (offload=disk) is read now
    home = next(layers[i].parameters()).device  # an offloaded model keeps its layers on the CPU: so will we
    layer = layers[i].to(device=device, dtype=torch.float32)  # targets and training in fp32 whatever the model dtype
    parts = adapter.parts(layer, model.config)
    stats, targets = {}, None
    if ccfg.needs_data(method):
        targets, stats = _layer_io(layer, inps, pe, ccfg.batch_size, parts.slot_inputs(), out=spare)
    gen = torch.Generator().manual_seed(ccfg.seed * 100003 + i)
    qcfg_layer = qcfg if method.learnable_clip else _no_clip(qcfg)
    qlayer = CalibLayer(parts, qcfg_layer, method.transforms(parts, stats, gen)).to(device)
    report = LayerReport(i)
    saved = store.load(i)
    if saved is not None:
        qlayer.load_state_dict(saved[0], strict=False)
        report = LayerReport(**{**saved[1], "resumed": True})
    elif method.trainable and ccfg.epochs > 0:
        _train_with_fallback(qlayer, inps, targets, pe, ccfg, report, bar)
    if not method.trainable and targets is not None and not math.isfinite(report.final_loss):
        # nothing to train: the MSE its transforms leave, measured as a trained layer's is
        report.init_loss = report.final_loss = layer_mse(qlayer, inps, targets, pe, ccfg.batch_size)
    report.seconds = report.seconds or time.time() - t0
    state = trainable_state(qlayer)
    if saved is None:
        store.save(i, state, report)
    if convert_layer:
        layers[i] = _convert(qlayer, inps, pe, ccfg).to(home)
    if targets is not None:
        state["_targets"] = targets
    return report, state


def _convert(qlayer: CalibLayer, inps, pe, ccfg: CalibConfig):
    """The layer's QuantLayer, its weights quantized by RTN, or by GPTQ on Hessians of the merged layer's inputs."""
    batches = (to_device(inps[i : i + ccfg.batch_size], pe[0].device) for i in range(0, len(inps), ccfg.batch_size)) \
        if ccfg.wquant == "gptq" else ()
    gptq = GPTQOptions(ccfg.gptq_blocksize, ccfg.gptq_percdamp, ccfg.gptq_act_order)
    return convert(qlayer, ccfg.wquant, batches, pe, gptq)


def _no_clip(qcfg: QuantConfig) -> QuantConfig:
    return QuantConfig(**{**asdict(qcfg), "lwc": False, "lac": False})


def _train_with_fallback(qlayer, inps, targets, pe, ccfg, report: LayerReport, bar) -> None:
    start = {k: v.clone() for k, v in qlayer.state_dict().items()}
    report.init_loss = layer_mse(qlayer, inps, targets, pe, ccfg.batch_size)
    for attempt, lr in enumerate((ccfg.lr, ccfg.lr / 10)):
        losses = train_layer(qlayer, inps, targets, pe, ccfg, lr, bar)
        final = layer_mse(qlayer, inps, targets, pe, ccfg.batch_size) if losses and math.isfinite(losses[-1]) else float("nan")
        if math.isfinite(final):
            report.epoch_losses, report.final_loss = losses, final
            if attempt:
                report.fallback = "lr/10"
            return
        qlayer.load_state_dict(start)
    report.fallback, report.final_loss = "initial", report.init_loss
