"""Figures from tracked runs: per-layer calibration loss curves, init vs final MSE, per-layer MSE by method,
perplexity against bits, kernel speedups, flatness.

    python -m analysis.plots --uri sqlite:///$PWD/mlflow.db --experiment flatquant --out results/plots
    python -m analysis.plots --run-id <id> --bench results/bench --out results/plots

Each `*_figure` function builds a matplotlib Figure from plain data (so tests and the pipeline can call it with
numbers it already has); the I/O wrappers (`loss_curves`, `layer_mse`, `speedup_chart`, `flatness_plot`) read
the data, save a PNG under the output folder and return its path, which a stage may log with
`tracker.artifact(path, "plots")`. The Agg backend is forced: no display is ever needed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter  # noqa: E402

LAYER_LOSS = re.compile(r"^calibrate/layer_(\d+)/loss$")
FLATNESS_ORDER = ["original", "smoothquant", "hadamard", "flatquant"]
FLATNESS_LABELS = {"original": "Original", "smoothquant": "SmoothQuant (diag scale)", "hadamard": "Hadamard",
                   "flatquant": "FlatQuant"}


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_y(ax) -> None:
    """Log y axis labelled at 1, 2, 5 × 10^k in plain numbers, readable even when the data span one decade."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())


def loss_curves_figure(curves: dict[int, list[float]], title: str = "") -> Figure:
    """One line per decoder layer: calibration loss (MSE to the FP output) against epoch, coloured by depth."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = sorted(curves)
    cmap = plt.get_cmap("viridis")
    for i in layers:
        ys = curves[i]
        ax.plot(range(len(ys)), ys, marker="o" if len(ys) < 3 else None, ms=3, lw=1.2,
                color=cmap(i / max(layers[-1], 1)), label=f"layer {i}")
    ax.set(xlabel="epoch", ylabel="block output MSE", title=title or "Calibration loss per layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(v > 0 for ys in curves.values() for v in ys):
        _log_y(ax)
    ax.grid(alpha=0.3, which="both")
    if layers:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], layers[-1]))
        fig.colorbar(sm, ax=ax, label="layer")
    return fig


def paper_figure(table, title: str = "") -> Figure:
    """Two panels over the rows of analysis.tables.paper_table: WikiText-2 perplexity (log axis, FP16 as a line)
    and the zero-shot QA average (FP16 as a line); rows without a value are left out of a panel."""
    import textwrap

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, col, label, log in ((axes[0], "WikiText-2 ppl", "WikiText-2 perplexity (log)", True),
                                (axes[1], "QA avg", "zero-shot QA average (%)", False)):
        vals = table[col]
        rows = [r for r in vals.index if r != "FP16" and not math.isnan(vals[r])]
        if not rows:  # say so rather than draw empty axes
            ax.text(0.5, 0.5, f"no {label.split(' (')[0]} in these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        colors = ["#4c72b0" if r.endswith("GPTQ") else "#dd8452" for r in rows]
        ax.bar(range(len(rows)), [vals[r] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), rows, rotation=35, ha="right")
        if "FP16" in vals.index and not math.isnan(vals["FP16"]):
            ax.axhline(vals["FP16"], color="k", ls="--", lw=1, label=f"FP16 {vals['FP16']:.2f}")
            ax.legend(loc="upper left" if log else "lower left")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
    fig.suptitle("\n".join(textwrap.wrap(title, 130)), fontsize=9)
    fig.tight_layout()
    return fig


def layer_mse_figure(init: dict[int, float], final: dict[int, float], title: str = "") -> Figure:
    """Block output MSE before calibration (init) and after (final) for each layer, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for data, label, style in ((init, "init (before calibration)", "o--"), (final, "final (after)", "s-")):
        xs = sorted(k for k, v in data.items() if math.isfinite(v))
        ax.plot(xs, [data[x] for x in xs], style, ms=4, label=label)
    ax.set(xlabel="layer", ylabel="block output MSE", title=title or "Per-layer MSE: init vs final")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(v > 0 for v in [*init.values(), *final.values()]):
        _log_y(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def layer_mse_methods_figure(series: dict[str, list[float | None]], title: str = "") -> Figure:
    """One line per method: each decoder layer's output MSE against the full-precision layer (the same
    measurement for a trained method after training and for a baseline with its transforms), log scale."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, ys in series.items():
        pts = [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y) and y > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.4, label=label)
    ax.set(xlabel="decoder layer", ylabel="layer output MSE vs FP (log)", title=title or "Per-layer MSE by method")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_y(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def ppl_bits_figure(table, fp: float | None = None, title: str = "") -> Figure:
    """Perplexity (log) against the bit configuration (columns of `table`, fewest bits first), one line per
    method (rows); the full-precision model as a dashed line."""
    import textwrap

    fig, ax = plt.subplots(figsize=(8, 4.8))
    xs = list(range(len(table.columns)))
    for label, row in table.iterrows():
        pts = [(x, v) for x, v in zip(xs, row.to_numpy(dtype=float)) if math.isfinite(v)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1.6, label=label)
    if fp is not None and math.isfinite(fp):
        ax.axhline(fp, color="k", ls="--", lw=1, label=f"FP16 {fp:.2f}")
    ax.set_xticks(xs, [c.upper() for c in table.columns])
    ax.set(xlabel="weight / activation / KV-cache bits", ylabel="WikiText-2 perplexity (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    return fig


def _tensor(x):
    import torch

    return torch.as_tensor(x).detach().float().cpu()


def channel_max(x):
    """Per-channel max |x| sorted descending. `x: (..., channels)`: the max is over every other axis."""
    x = _tensor(x).abs()
    x = x.reshape(-1, x.shape[-1])
    return x.amax(0).sort(descending=True).values.numpy()


def flatness_curves(acts: dict, weights: dict, title: str = "") -> Figure:
    """FlatQuant Fig. 1-style flatness: sorted per-channel max |value| of one layer's qkv input and weights.

    `acts[name]: (tokens, hidden)` the input of q/k/v_proj after the method's transform (any float dtype);
    `weights[name]: (out, hidden)` the merged q/k/v weight (nn.Linear layout), whose per-input-channel column
    max is plotted, since those are the channels the transform mixes. Names are usually "original",
    "smoothquant" (diagonal scale only), "hadamard", "flatquant"; any other name is drawn too. Flatter curves
    mean fewer outliers and smaller 4-bit rounding error.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data, kind in ((axes[0], acts, "activation"), (axes[1], weights, "weight column")):
        names = [n for n in FLATNESS_ORDER if n in data] + sorted(set(data) - set(FLATNESS_ORDER))
        for name in names:
            ys = channel_max(data[name])
            ax.plot(range(len(ys)), ys, lw=1.6, label=FLATNESS_LABELS.get(name, name))
        ax.set(xlabel="input channel (sorted by max |value|)", ylabel="max |value|",
               title=f"{kind}: per-channel max |value|")
        _log_y(ax)
        ax.grid(alpha=0.3, which="both")
        if names:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def flatness_plot(acts: dict, weights: dict, out_dir: str | Path = "results/plots", name: str = "flatness",
                  title: str = "") -> Path:
    """`flatness_curves` saved as <out_dir>/<name>.png."""
    return save(flatness_curves(acts, weights, title), Path(out_dir) / f"{name}.png")


def _records(blob) -> list[dict]:
    if isinstance(blob, dict):
        for key in ("records", "results", "rows", "benchmarks", "data"):
            if isinstance(blob.get(key), list):
                return _records(blob[key])
        return [blob]
    return [r for r in blob if isinstance(r, dict)] if isinstance(blob, list) else []


def _first(rec: dict, *keys):
    return next((rec[k] for k in keys if rec.get(k) is not None), None)


def speed_records(bench_dir: str | Path) -> list[dict]:
    """Every benchmark record under `bench_dir/*.json` that yields a speedup: {"label", "ratio"}.

    Tolerant of the format: a file may hold a list of records, one record, or a dict with a "records" /
    "results" list. The ratio is `ratio` / `speedup`, else reference time over ours (`torch_ms` / `ours_ms`,
    also `ref_ms`, `fp16_ms`, `baseline_ms` over `ms`, `triton_ms`, `kernel_ms`). The label joins whichever of
    kernel / name / op / linear (or a layer's phase and batch), shape (or in→out features) and tokens are present. Files or records that do not parse are skipped.
    """
    out = []
    for path in sorted(Path(bench_dir).glob("*.json")):
        try:
            recs = _records(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        for rec in recs:
            ratio = _first(rec, "ratio", "speedup")
            ours, ref = _first(rec, "ours_ms", "triton_ms", "kernel_ms", "ms"), \
                _first(rec, "torch_ms", "ref_ms", "fp16_ms", "baseline_ms")
            if ratio is None and ours and ref:
                ratio = float(ref) / float(ours)
            try:
                ratio = float(ratio)
            except (TypeError, ValueError):
                continue
            shape = rec.get("shape") or (f"{rec['in']}→{rec['out']}" if rec.get("in") and rec.get("out") else None)
            what = _first(rec, "kernel", "name", "op", "linear", "layer")
            if what is None and rec.get("phase"):  # a whole decoder layer (bench_layer): phase and batch
                what = f"layer {rec['phase']} b{rec.get('batch', '?')}"
            parts = [what, shape, None if rec.get("tokens") is None else f"{rec['tokens']} tok"]
            label = " ".join(str(p) if not isinstance(p, (list, tuple)) else "×".join(map(str, p))
                             for p in parts if p is not None) or path.stem
            out.append({"label": label, "ratio": ratio})
    return out


def speedup_figure(records: list[dict], title: str = "") -> Figure:
    """Horizontal bars of speedup over the PyTorch/FP16 reference; the dashed line marks 1.0 (no gain)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(records) + 1.6))
    labels, ratios = [r["label"] for r in records], [r["ratio"] for r in records]
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    ax.barh(range(len(records)), ratios, color=colors)
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}×", va="center", fontsize=8)
    ax.set_yticks(range(len(records)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set(xlabel="speedup over reference (×)", title=title or "Kernel speedup")
    ax.set_xlim(0, max(ratios + [1.0]) * 1.18)
    fig.tight_layout()
    return fig


def speedup_chart(bench_dir: str | Path = "results/bench", out_dir: str | Path = "results/plots") -> Path | None:
    """speedup.png from results/bench/*.json, or None when there is nothing to plot."""
    records = speed_records(bench_dir) if Path(bench_dir).is_dir() else []
    return save(speedup_figure(records), Path(out_dir) / "speedup.png") if records else None


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def loss_curves(tracking_uri: str, run_id: str, out_dir: str | Path = "results/plots") -> Path | None:
    """Loss curves of one run, every layer in one figure: the epoch losses its calibration store records (the
    `calibration/manifest.json` artifact), or, for runs logged before, its `calibrate/layer_XXX/loss` histories;
    None if it has neither."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    curves = _manifest_curves(client, run_id)
    if not curves:
        keys = {int(m.group(1)): k for k in run.data.metrics if (m := LAYER_LOSS.match(k))}
        curves = {i: [v for _, v in sorted(_history(client, run_id, k).items())] for i, k in keys.items()}
    if not curves:
        return None
    fig = loss_curves_figure(curves, f"Calibration loss per layer — {run.info.run_name}")
    return save(fig, Path(out_dir) / f"loss_curves_{run_id[:8]}.png")


def _manifest_curves(client, run_id: str) -> dict[int, list[float]]:
    """{layer: epoch losses} from the run's logged calibration store; {} when it logged none or trained nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "calibration/manifest.json", tmp)
        except Exception:  # no such artifact (a method without calibration, tracking without artifacts)
            return {}
        layers = json.loads(Path(path).read_text()).get("layers", {})
    return {int(i): e["report"]["epoch_losses"] for i, e in layers.items() if e.get("report", {}).get("epoch_losses")}


def layer_mse(tracking_uri: str, run_id: str, out_dir: str | Path = "results/plots") -> Path | None:
    """Init vs final MSE per layer from `calibrate/by_layer/init_mse` / `final_mse` (step = layer); None if absent."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    init, final = (_history(client, run_id, f"calibrate/by_layer/{k}") or _history(client, run_id, f"calibrate/{k}")
                   for k in ("init_mse", "final_mse"))  # the second: runs logged before the by_layer keys
    if not init and not final:
        return None
    fig = layer_mse_figure(init, final, f"Per-layer MSE: init vs final — {run.info.run_name}")
    return save(fig, Path(out_dir) / f"layer_mse_{run_id[:8]}.png")


def latest_run_id(tracking_uri: str, experiment: str) -> str | None:
    """The most recent FINISHED run that logged calibration losses."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    trained = lambda r: "calibrate/mean_final_mse" in r.data.metrics or any(LAYER_LOSS.match(k) for k in r.data.metrics)
    return next((r.info.run_id for r in runs if trained(r)), None)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}", help="MLflow tracking URI")
    p.add_argument("--experiment", default="flatquant")
    p.add_argument("--run-id", help="run to plot (default: the latest finished run with calibration losses)")
    p.add_argument("--bench", default="results/bench", help="folder of benchmark JSON files")
    p.add_argument("--out", default="results/plots")
    args = p.parse_args(argv)
    run_id = args.run_id or latest_run_id(args.uri, args.experiment)
    paths = [speedup_chart(args.bench, args.out)]
    if run_id:
        paths += [loss_curves(args.uri, run_id, args.out), layer_mse(args.uri, run_id, args.out)]
    paths = [p for p in paths if p is not None]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
