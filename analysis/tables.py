"""Result tables laid out like FlatQuant's Table 1 (perplexity) and Table 2 (zero-shot QA), from tracked runs.

    python -m analysis.tables --uri sqlite:///$PWD/mlflow.db --experiment flatquant --out results/tables
    python -m analysis.tables --from-json results/runs --out results/tables [--bits results/runs_bits]

Two sources give the same frame (one row per run): the MLflow store (`runs_frame`, FINISHED runs only) and the
per-run JSON files that `dvc repro` writes (`json_frame`, each {"config": {...}, "metrics": {...}}), so the DVC
`tables` stage needs no MLflow store. Rows are keyed by (model, method, bits, wquant); when a combination was run
more than once the latest run wins. Missing values print as "—".
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd

from flatquant.flat import flatten

KEYS = ["model", "method", "bits", "wquant"]
MISSING = "—"
PPL_DATASETS = {"wikitext2": "WikiText-2", "c4": "C4"}
QA_TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag_llamacpp", "winogrande", "lambada_openai"]  # the paper's order
PRETTY = {"fp16": "FP16", "rtn": "RTN", "gptq": "GPTQ", "smoothquant": "SmoothQuant", "omniquant": "OmniQuant",
          "affinequant": "AffineQuant", "quarot": "QuaRot", "spinquant": "SpinQuant", "flatquant": "FlatQuant"}
METHOD_ORDER = ["rtn", "smoothquant", "omniquant", "affinequant", "quarot", "spinquant", "flatquant"]
WQUANT_ORDER = ["rtn", "gptq"]


def bits_tag(params: dict) -> str:
    """`w4a4kv4` from flattened params (what pipeline.runner.run_name prints); v_bits defaults to k_bits."""
    def num(key, default=None):
        v = params.get(key, default)
        return None if v in (None, "None") else int(float(v))

    w, a, k = num("quant.w_bits"), num("quant.a_bits"), num("quant.k_bits")
    v = num("quant.v_bits", params.get("quant.k_bits"))
    return f"w{w}a{a}kv{max(k or 0, v or 0)}"


CAPTION_PARAMS = ("calib.nsamples", "calib.seqlen", "calib.epochs", "seed", "eval.seqlen", "eval.max_windows", "eval.qa_limit")


def _record(params: dict, metrics: dict, **meta) -> dict:
    row = {"model": str(params.get("model.name")), "method": str(params.get("method.name")),
           "bits": bits_tag(params), "wquant": str(params.get("wquant", "rtn")), **meta}
    row.update({k: str(params[k]) for k in CAPTION_PARAMS if k in params})  # "None" where the config says null
    row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return row


def _frame(rows: list[dict]) -> pd.DataFrame:
    meta = ["run_id", "run_name", "start_time", *KEYS]
    df = pd.DataFrame(rows, columns=None if rows else meta)
    return df[meta + sorted(c for c in df.columns if c not in meta)]


def runs_frame(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per FINISHED run of `experiment`: run_id, run_name, start_time (ms), model, method, bits, wquant,
    then one column per metric key (its latest value), e.g. "eval_ppl/wikitext2/ppl". parent_run_id keeps only
    the runs of one sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return _frame([])
    rows, token = [], None
    while True:
        query = "attributes.status = 'FINISHED'"
        if parent_run_id:
            query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
        page = client.search_runs([exp.experiment_id], query, max_results=1000,
                                  page_token=token)
        for r in page:
            rows.append(_record(r.data.params, r.data.metrics, run_id=r.info.run_id, run_name=r.info.run_name,
                                start_time=r.info.start_time))
        token = page.token
        if not token:
            return _frame(rows)


def json_frame(paths: str | Path | list) -> pd.DataFrame:
    """The same frame from per-run JSON files (a folder of *.json, or a list of files). Each file holds
    {"config": nested or flattened run config, "metrics": {key: value}}; an optional "run_id" and "start_time"
    (ms) are used when present, else the file name and its modification time."""
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        paths = sorted(Path(paths).glob("*.json"))
    rows = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        blob = json.loads(p.read_text())
        params = flatten(blob.get("config", {}))
        layers = blob.get("layers") or {}
        rows.append(_record(params, blob.get("metrics", {}), device=blob.get("device"), run_id=blob.get("run_id", p.stem),
                            layer_mse=layers.get("final_mse"),
                            run_name=blob.get("run_name", p.stem),
                            start_time=blob.get("start_time", int(p.stat().st_mtime * 1000))))
    return _frame(rows)


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """One run per (model, method, bits, wquant): the one that started last."""
    return df.sort_values("start_time", kind="stable").drop_duplicates(KEYS, keep="last")


def per_seed(df: pd.DataFrame) -> pd.DataFrame:
    """One run per (model, method, bits, wquant, seed): the latest of each seed."""
    keys = KEYS + (["seed"] if "seed" in df else [])
    return df.sort_values("start_time", kind="stable").drop_duplicates(keys, keep="last")


def _label(method: str, wquant: str) -> str:
    name = PRETTY.get(method, method)
    return name if method == wquant else f"{name}-{PRETTY.get(wquant, wquant)}"


def _row_order(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(bits, method, wquant) of the quantized rows, in the paper's order: RTN-weight rows, then GPTQ ones."""
    rank = lambda order, x: (order.index(x) if x in order else len(order), x)
    combos = {(b, m, w) for b, m, w in df[["bits", "method", "wquant"]].itertuples(index=False) if m != "fp16"}
    return sorted(combos, key=lambda c: (c[0], rank(WQUANT_ORDER, c[2]), rank(METHOD_ORDER, c[1])))


def _seed_stats(df: pd.DataFrame, key: str) -> tuple[float, float, int]:
    """(mean, sample std, n) of `key` over the seeds of one row's runs (latest run per seed)."""
    vals = df[key].dropna().to_numpy(dtype=float) if key in df else []
    if len(vals) == 0:
        return math.nan, math.nan, 0
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _fp_value(runs: pd.DataFrame, fp_key: str, key: str) -> float:
    """Latest full-precision number of one model: the `*_fp` metric of any run, or an fp16 run's own metric."""
    runs = runs.sort_values("start_time", kind="stable")
    cands = []
    if fp_key in runs:
        cands += [(t, v) for t, v in zip(runs["start_time"], runs[fp_key]) if pd.notna(v)]
    fp16 = runs[runs["method"] == "fp16"]
    if key in fp16:
        cands += [(t, v) for t, v in zip(fp16["start_time"], fp16[key]) if pd.notna(v)]
    return float(max(cands, key=lambda c: c[0])[1]) if cands else math.nan


def _build(df: pd.DataFrame, columns: list[tuple[str, str]], keys: dict, fp_keys: dict) -> pd.DataFrame:
    """Rows: FP16 then each quantized (bits, method, wquant); columns: (model, column name) → metric key."""
    seeds = per_seed(df)
    df = latest(df)
    combos = _row_order(df)
    many_bits = len({c[0] for c in combos}) > 1
    rows, stds, ns, labels = [], [], [], []
    if not df.empty:
        rows.append([_fp_value(df[df["model"] == m], fp_keys[c], keys[c]) for m, c in columns])
        stds.append([math.nan] * len(columns))
        ns.append([1] * len(columns))
        labels.append("FP16")
    for bits, method, wq in combos:
        sel = seeds[(seeds["bits"] == bits) & (seeds["method"] == method) & (seeds["wquant"] == wq)]
        stats = [_seed_stats(sel[sel["model"] == m], keys[c]) for m, c in columns]
        rows.append([st[0] for st in stats])
        stds.append([st[1] for st in stats])
        ns.append([st[2] for st in stats])
        labels.append(_label(method, wq) + (f" ({bits.upper()})" if many_bits else ""))
    index = pd.Index(labels, name="method")
    cols = pd.MultiIndex.from_tuples(columns, names=["model", "metric"])
    out = pd.DataFrame(rows, index=index, columns=cols, dtype=float)
    out.attrs["std"] = pd.DataFrame(stds, index=index, columns=cols, dtype=float)  # over seeds, where n > 1
    out.attrs["n"] = pd.DataFrame(ns, index=index, columns=cols)
    return out


def _models(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df.sort_values("start_time", kind="stable")["model"]))


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1: rows FP16 and method-weight quantizer (e.g. "FlatQuant-RTN"), columns (model, "WikiText-2" | "C4"
    | other evaluated sets, each only where some run evaluated it), values perplexity (NaN where missing; a row
    over several seeds holds their mean, with the std in .attrs["std"]). FP16 comes from `eval_ppl/<ds>/ppl_fp`."""
    found = [c.split("/")[1] for c in df.columns if c.startswith("eval_ppl/") and c.endswith("/ppl")]
    datasets = [d for d in PPL_DATASETS if d in found] + sorted(set(found) - set(PPL_DATASETS))  # none all "—"
    names = {d: PPL_DATASETS.get(d, d) for d in datasets}
    columns = [(m, names[d]) for m in _models(df) for d in datasets]
    keys = {names[d]: f"eval_ppl/{d}/ppl" for d in datasets}
    fp_keys = {names[d]: f"eval_ppl/{d}/ppl_fp" for d in datasets}
    return _build(df, columns, keys, fp_keys)


def qa_table(df: pd.DataFrame, tasks: list[str] = QA_TASKS) -> pd.DataFrame:
    """Table 2: rows as in `ppl_table`, columns (model, task | "average"), values zero-shot accuracy in percent
    from `eval_qa/<task>/acc` (FP16 from `eval_qa/<task>/acc_fp`). The average is recomputed over `tasks` and
    left missing unless every task is there, so it always means the same six-task mean as the paper's."""
    columns = [(m, t) for m in _models(df) for t in tasks]
    keys = {t: f"eval_qa/{t}/acc" for t in tasks}
    fp_keys = {t: f"eval_qa/{t}/acc_fp" for t in tasks}
    built = _build(df, columns, keys, fp_keys)
    table = built * 100.0
    for m in _models(df):
        table[(m, "average")] = table[m][tasks].mean(axis=1, skipna=False)
    out = table[[(m, c) for m in _models(df) for c in [*tasks, "average"]]] if len(table.columns) else table
    out.attrs = {"std": built.attrs["std"] * 100.0, "n": built.attrs["n"]}  # in percent, as the values
    return out


DESTROYED = 1000.0  # a perplexity above this is a destroyed model: its digits change from machine to machine


def to_text(table: pd.DataFrame, digits: int = 2, destroyed: float | None = None) -> pd.DataFrame:
    """Formatted copy: fixed decimals, "mean ± std (n)" where a row averages several seeds, "—" where missing,
    "> 1000 (destroyed)" above `destroyed`, columns flattened to "model / metric"."""
    std = table.attrs.get("std", pd.DataFrame(math.nan, index=table.index, columns=table.columns))
    n = table.attrs.get("n", pd.DataFrame(1, index=table.index, columns=table.columns))

    def fmt(v, s, k):
        if pd.isna(v):
            return MISSING
        if destroyed is not None and v > destroyed:
            return f"> {destroyed:.0f} (destroyed)"
        return f"{v:.{digits}f} ± {s:.{digits}f} ({int(k)} seeds)" if k > 1 and not pd.isna(s) else f"{v:.{digits}f}"

    cells = [[fmt(v, s, k) for v, s, k in zip(r, rs, rn)]
             for r, rs, rn in zip(table.to_numpy(), std.reindex_like(table).to_numpy(), n.reindex_like(table).to_numpy())]
    return pd.DataFrame(cells, index=table.index,
                        columns=[" / ".join(c) if isinstance(c, tuple) else str(c) for c in table.columns])


def to_markdown(table: pd.DataFrame, digits: int = 2, destroyed: float | None = None) -> str:
    text = to_text(table, digits, destroyed)
    head = [table.index.name or "", *text.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(text.columns)) + "|"]
    lines += ["| " + " | ".join([str(i), *row]) + " |" for i, row in zip(text.index, text.itertuples(index=False))]
    return "\n".join(lines) + "\n"


def _bits_key(tag: str) -> tuple[int, ...]:
    """w4a4kv4 → (4, 4, 4): sort bit configurations fewest bits first."""
    nums = [int(n) for n in re.findall(r"\d+", tag)]
    return (sum(nums), *nums)


def bits_table(df: pd.DataFrame, dataset: str = "wikitext2") -> pd.DataFrame:
    """Perplexity by method-weight quantizer (rows, the paper's order; those run at two bit widths or more) and bit
    configuration (columns, fewest bits first), the latest run of each; the FP16 perplexity in .attrs["fp"]."""
    key = f"eval_ppl/{dataset}/ppl"
    runs = latest(df[df["method"] != "fp16"]) if key in df else df.iloc[0:0]
    cols = sorted(set(runs["bits"]), key=_bits_key)
    rows = [(m, w) for w in WQUANT_ORDER for m in METHOD_ORDER if ((runs["method"] == m) & (runs["wquant"] == w)).any()]
    out = pd.DataFrame(math.nan, index=[_label(m, w) for m, w in rows], columns=cols)
    for _, r in runs.iterrows():
        out.loc[_label(r["method"], r["wquant"]), r["bits"]] = r[key]
    out = out[out.notna().sum(axis=1) >= min(2, len(cols))]  # a method run at one bit width only is no curve
    out.index.name = "method"
    fp = df[f"{key}_fp"].dropna() if f"{key}_fp" in df else pd.Series(dtype=float)
    out.attrs["fp"] = float(fp.iloc[-1]) if len(fp) else math.nan
    return out


def write_bits(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """ppl_bits.md (captioned) and ppl_bits.png: perplexity against bits for each method; nothing when the runs
    hold one bit configuration only."""
    table = bits_table(df)
    if len(table.columns) < 2:
        return []
    from analysis.plots import ppl_bits_figure, save

    out_dir = Path(out_dir)
    cap = re.sub(r", W\d+A\d+KV\d+(, W\d+A\d+KV\d+)*;", ";", caption(df))  # the columns name the bits
    cap = f"WikiText-2 perplexity against bits (kv16: no KV-cache quantization). {cap}"
    (out_dir / "ppl_bits.md").write_text(f"{cap}\n\n{to_markdown(table, destroyed=DESTROYED)}")
    return [out_dir / "ppl_bits.md", save(ppl_bits_figure(table, table.attrs["fp"], cap), out_dir / "ppl_bits.png")]


def write_layer_mse(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """layer_mse.png: each layer's output MSE for every method (RTN weights, seed 0's latest run), from the
    "layers" series of the run files; nothing when no run carries one."""
    if "layer_mse" not in df:
        return []
    runs = latest(df[(df["wquant"] == "rtn") & df["layer_mse"].map(lambda v: isinstance(v, list) and len(v) > 0)
                     & (df["seed"].astype(str) == "0" if "seed" in df else True)])
    if runs.empty:
        return []
    from analysis.plots import layer_mse_methods_figure, save

    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    runs = runs.sort_values("method", key=lambda s: s.map(lambda m: order.get(m, len(order))))
    series = {_label(r["method"], r["wquant"]): r["layer_mse"] for _, r in runs.iterrows()}
    title = f"Per-layer output MSE against FP, {runs['model'].iloc[0]}, {runs['bits'].iloc[0].upper()} (RTN weights)"
    return [save(layer_mse_methods_figure(series, title), Path(out_dir) / "layer_mse.png")]


def write_tables(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """ppl.md / ppl.csv / qa.md / qa.csv under `out_dir`, each .md with its caption (a table with no numbers says
    why instead of printing dashes); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cap = caption(df) if len(df) else ""
    noise = (" Rows of trained methods over several seeds show mean ± sample std; a perplexity above "
             f"{DESTROYED:.0f} is shown as destroyed (its digits change from machine to machine).")
    for name, table, destroyed in (("ppl", ppl_table(df), DESTROYED), ("qa", qa_table(df), None)):
        empty = table.empty or table.isna().all().all() or table.drop(index="FP16", errors="ignore").isna().all().all()
        if empty:
            why = ("No run behind this table scored any zero-shot QA task (the quick CPU schedule sets "
                   "eval.qa_tasks=[]); `eval=full`, or eval.qa_tasks=[piqa,arc_easy], scores them." if name == "qa"
                   else "No run behind this table has a perplexity.")
            (out_dir / f"{name}.md").write_text(f"{cap}\n\n{why}\n")
            pd.DataFrame(columns=["method"]).to_csv(out_dir / f"{name}.csv", index=False)
        else:
            (out_dir / f"{name}.md").write_text(f"{cap}{noise}\n\n{to_markdown(table, destroyed=destroyed)}")
            to_text(table, destroyed=destroyed).to_csv(out_dir / f"{name}.csv")
        paths += [out_dir / f"{name}.md", out_dir / f"{name}.csv"]
    if not ppl_table(df).empty and len(_models(df)) == 1:
        from analysis.plots import paper_figure, save

        table = paper_table(df)
        paths.append(save(paper_figure(table, cap), out_dir / "ppl.png"))
    return paths + write_layer_mse(df, out_dir)


QA_SHORT = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag_llamacpp": "HellaSwag",
            "winogrande": "WinoGrande", "lambada_openai": "LAMBADA"}


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """FlatQuant's Tables 1–2 as one, for one model: rows FP16 then method-weight quantizer; columns WikiText-2
    perplexity, the six zero-shot accuracies (%) and their average (missing unless all six are there)."""
    models = _models(df)
    if len(models) != 1:
        raise ValueError(f"the paper table is for one model; these runs hold {models}")
    ppl, qa = ppl_table(df), qa_table(df)
    out = pd.DataFrame(index=ppl.index)
    out["WikiText-2 ppl"] = ppl[(models[0], "WikiText-2")]
    for task in QA_TASKS:
        out[QA_SHORT[task]] = qa[(models[0], task)]
    out["QA avg"] = qa[(models[0], "average")]
    rows = ["FP16", *[_label(m, w) for w in WQUANT_ORDER for m in PAPER_METHODS]]
    return out.reindex(rows + [r for r in out.index if r not in rows])  # a paper row with no run stays, as "—"


PAPER_METHODS = ["rtn", "smoothquant", "quarot", "flatquant"]  # the rows of FlatQuant's Tables 1–2 that run here


def caption(df: pd.DataFrame) -> str:
    """Model, bits, schedule, windows, QA items and device of the runs behind a table (each as the runs agree)."""
    def one(col: str, fmt=str) -> str:
        vals = sorted({fmt(v) for v in df[col].dropna()}) if col in df else []
        return ", ".join(vals) if vals else "?"

    windows = one("eval.max_windows", lambda v: "all" if v in (None, "None") else f"the first {v}")
    scored = any(c.startswith("eval_qa/") and df[c].notna().any() for c in df.columns)
    qa = (f"QA items per task: {one('eval.qa_limit', lambda v: 'all' if v in (None, 'None') else str(v))}"
          if scored else "no QA task scored")
    return (f"{one('model')}, {one('bits').upper()}; calibration {one('calib.nsamples')} × {one('calib.seqlen')} "
            f"tokens, {one('calib.epochs')} epochs (seed {one('seed')}); WikiText-2 test windows of "
            f"{one('eval.seqlen')} tokens: {windows}; {qa}; "
            f"run on {one('device')}.")


def write_paper_table(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """paper.md (with its caption), paper.csv and paper.png (perplexity, log axis, and QA average per row)."""
    from analysis.plots import paper_figure, save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = paper_table(df)
    cap = caption(df)
    missing = [r for r in table.index if table.loc[r].isna().all()]
    if missing:
        cap += f" No finished run behind {', '.join(missing)}."
    incomplete = [r for r in table.index if r not in missing and pd.isna(table.loc[r, "QA avg"])]
    if incomplete:
        cap += f" {', '.join(incomplete)}: QA not scored (every task is needed for the average)."
    cap += f" A perplexity above {DESTROYED:.0f} is shown as destroyed; paper.csv holds every digit."
    (out_dir / "paper.md").write_text(f"{cap}\n\n{to_markdown(table, destroyed=DESTROYED)}")
    to_text(table).to_csv(out_dir / "paper.csv")
    save(paper_figure(table, cap), out_dir / "paper.png")
    return [out_dir / "paper.md", out_dir / "paper.csv", out_dir / "paper.png"]


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}", help="MLflow tracking URI")
    p.add_argument("--experiment", default="flatquant")
    p.add_argument("--from-json", metavar="DIR", nargs="+", help="read <DIR>/*.json (run.py +metrics_out) instead of the MLflow store")
    p.add_argument("--out", default="results/tables")
    p.add_argument("--paper", action="store_true", help="one table as the paper lays it out (ppl + QA), with a caption and a plot")
    p.add_argument("--bits", metavar="DIR", nargs="+", help="runs at other bit widths (JSON folders): with the main "
                   "runs, perplexity against bits (ppl_bits.md, ppl_bits.png)")
    args = p.parse_args(argv)
    if args.from_json:
        df = pd.concat([json_frame(d) for d in args.from_json], ignore_index=True)
    else:
        df = runs_frame(args.uri, args.experiment)
    paths = write_paper_table(df, args.out) if args.paper else write_tables(df, args.out)
    if args.bits:
        bits = pd.concat([df, *[json_frame(d) for d in args.bits]], ignore_index=True)
        paths += write_bits(bits[bits["seed"].astype(str) == "0"] if "seed" in bits else bits, args.out)
    for path in paths:
        if path.suffix == ".md":
            print(f"{path}:\n{path.read_text()}")
    return paths


if __name__ == "__main__":
    main()
