"""analysis.tables and analysis.plots against a real (temporary) MLflow store and per-run JSON files.

The store is written with MLflow's own client the way pipeline.tracking does it (flattened config as params,
`<stage>/<dataset>/<metric>` keys, per-layer loss histories with step = epoch), so no model is needed.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")
mlflow = pytest.importorskip("mlflow")

from analysis import plots, tables  # noqa: E402

QA = {"piqa": 0.70, "arc_easy": 0.60, "arc_challenge": 0.40, "hellaswag_llamacpp": 0.50, "lambada_openai": 0.45,
      "winogrande": 0.55}
# (model, method, wquant, start_time ms, status, metrics)
RUNS = [
    ("smollm2_135m", "rtn", "rtn", 1000, "FINISHED",
     {"eval_ppl/wikitext2/ppl": 900.0, "eval_ppl/wikitext2/ppl_fp": 20.0, "eval_qa/piqa/acc": 0.5}),
    ("smollm2_135m", "flatquant", "rtn", 2000, "FINISHED",
     {"eval_ppl/wikitext2/ppl": 40.0, "eval_ppl/wikitext2/ppl_fp": 20.0}),
    ("smollm2_135m", "flatquant", "rtn", 3000, "FINISHED",   # a re-run: the latest one wins
     {"eval_ppl/wikitext2/ppl": 30.0, "eval_ppl/wikitext2/ppl_fp": 21.0,
      **{f"eval_qa/{t}/acc": v for t, v in QA.items()}}),
    ("smollm2_135m", "flatquant", "rtn", 4000, "FAILED", {"eval_ppl/wikitext2/ppl": 1.0}),   # never counted
    ("smollm2_135m", "flatquant", "gptq", 3500, "FINISHED", {"eval_ppl/wikitext2/ppl": 28.0}),
    ("llama3_8b", "flatquant", "rtn", 5000, "FINISHED",
     {"eval_ppl/wikitext2/ppl": 6.98, "eval_ppl/c4/ppl": 11.13, "eval_ppl/wikitext2/ppl_fp": 6.14,
      "eval_ppl/c4/ppl_fp": 9.45}),
]
LAYERS, EPOCHS = 3, 4


def params(model: str, method: str, wquant: str) -> dict:
    return {"model.name": model, "method.name": method, "wquant": wquant, "quant.w_bits": "4", "quant.a_bits": "4",
            "quant.k_bits": "4", "quant.v_bits": "4", "seed": "0"}


def write_store(root) -> tuple[str, list[str]]:
    """A SQLite store with RUNS in experiment "flatquant"; returns (uri, run ids). The second run also carries
    calibration histories: calibrate/layer_XXX/loss (step = epoch), by_layer/init_mse and final_mse (step = layer)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("flatquant", artifact_location=(root / "mlartifacts").as_uri())
    ids = []
    for i, (model, method, wq, t0, status, metrics) in enumerate(RUNS):
        run = client.create_run(exp, start_time=t0, run_name=f"{model}/{method}/w4a4kv4/{wq}")
        ms = [Metric(k, v, t0 + 1, 0) for k, v in metrics.items()]
        if i == 1:
            ms += [Metric(f"calibrate/layer_{l:03d}/loss", 1e-2 / (l + 1) / (e + 1), t0 + e, e)
                   for l in range(LAYERS) for e in range(EPOCHS)]
            ms += [Metric(f"calibrate/by_layer/{k}", v * (l + 1), t0 + l, l)
                   for l in range(LAYERS) for k, v in (("init_mse", 0.1), ("final_mse", 0.01))]
        client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, v) for k, v in params(model, method, wq).items()])
        client.set_terminated(run.info.run_id, status, end_time=t0 + 10)
        ids.append(run.info.run_id)
    return uri, ids


def write_json(root) -> list:
    """The same finished runs as the per-run JSON files `python run.py +metrics_out=...` writes."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (model, method, wq, t0, status, metrics) in enumerate(RUNS):
        if status != "FINISHED":
            continue
        config = {"model": {"name": model}, "method": {"name": method}, "wquant": wq,
                  "quant": {"w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4}}
        path = root / f"run{i}.json"
        path.write_text(json.dumps({"config": config, "metrics": metrics, "start_time": t0}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"))


def test_runs_frame_has_one_row_per_finished_run(store):
    df = tables.runs_frame(store[0], "flatquant")
    assert len(df) == 5 and list(df.columns[:7]) == ["run_id", "run_name", "start_time", *tables.KEYS]
    assert set(df["bits"]) == {"w4a4kv4"} and 1.0 not in set(df["eval_ppl/wikitext2/ppl"])
    assert tables.runs_frame(store[0], "no-such-experiment").empty


def test_ppl_table_layout_and_latest_run_wins(store):
    t = tables.ppl_table(tables.runs_frame(store[0], "flatquant"))
    assert list(t.index) == ["FP16", "RTN", "FlatQuant-RTN", "FlatQuant-GPTQ"]
    assert list(t.columns) == [("smollm2_135m", "WikiText-2"), ("smollm2_135m", "C4"),
                               ("llama3_8b", "WikiText-2"), ("llama3_8b", "C4")]
    assert t.loc["FlatQuant-RTN", ("smollm2_135m", "WikiText-2")] == 30.0
    assert t.loc["FP16", ("smollm2_135m", "WikiText-2")] == 21.0       # from the latest ppl_fp
    assert t.loc["FP16", ("llama3_8b", "C4")] == 9.45
    assert t.loc["FlatQuant-GPTQ", ("smollm2_135m", "WikiText-2")] == 28.0
    assert math.isnan(t.loc["RTN", ("llama3_8b", "WikiText-2")])
    md = tables.to_markdown(t)
    assert md.splitlines()[0] == ("| method | smollm2_135m / WikiText-2 | smollm2_135m / C4 | llama3_8b / WikiText-2 "
                                  "| llama3_8b / C4 |")
    assert "| FlatQuant-RTN | 30.00 | — | 6.98 | 11.13 |" in md


def test_qa_table_average_needs_every_task(store):
    t = tables.qa_table(tables.runs_frame(store[0], "flatquant"))
    assert [c for m, c in t.columns if m == "smollm2_135m"] == [*tables.QA_TASKS, "average"]
    assert t.loc["FlatQuant-RTN", ("smollm2_135m", "piqa")] == pytest.approx(70.0)
    assert t.loc["FlatQuant-RTN", ("smollm2_135m", "average")] == pytest.approx(100 * sum(QA.values()) / 6)
    assert t.loc["RTN", ("smollm2_135m", "piqa")] == pytest.approx(50.0)
    assert math.isnan(t.loc["RTN", ("smollm2_135m", "average")])
    assert "—" in tables.to_markdown(t)


def test_json_files_give_the_same_tables(store, tmp_path):
    write_json(tmp_path / "runs")
    from_store, from_json = tables.runs_frame(store[0], "flatquant"), tables.json_frame(tmp_path / "runs")
    for build in (tables.ppl_table, tables.qa_table):
        assert tables.to_markdown(build(from_json)) == tables.to_markdown(build(from_store))


def test_cli_writes_markdown_and_csv(tmp_path):
    write_json(tmp_path / "runs")
    paths = tables.main(["--from-json", str(tmp_path / "runs"), "--out", str(tmp_path / "tables")])
    assert sorted(p.name for p in paths) == ["ppl.csv", "ppl.md", "qa.csv", "qa.md"]
    csv = (tmp_path / "tables" / "ppl.csv").read_text().splitlines()
    assert csv[0] == "method,smollm2_135m / WikiText-2,smollm2_135m / C4,llama3_8b / WikiText-2,llama3_8b / C4"
    assert csv[1] == "FP16,21.00,—,6.14,9.45"


def test_empty_store_gives_empty_tables(tmp_path):
    df = tables.json_frame(tmp_path)
    assert tables.ppl_table(df).empty and tables.qa_table(df).empty


def is_png(path) -> bool:
    return path is not None and path.stat().st_size > 2000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_plots_from_the_store(store, tmp_path):
    uri, ids = store
    assert plots.latest_run_id(uri, "flatquant") == ids[1]
    assert is_png(plots.loss_curves(uri, ids[1], tmp_path)) and is_png(plots.layer_mse(uri, ids[1], tmp_path))
    assert plots.loss_curves(uri, ids[0], tmp_path) is None        # a run without calibration histories


def test_speedup_chart_is_tolerant_of_the_format(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    assert plots.speedup_chart(bench, tmp_path) is None
    (bench / "a.json").write_text(json.dumps([{"shape": [4096, 4096], "tokens": 16, "ours_ms": 0.5, "torch_ms": 1.0},
                                              {"shape": "14336x4096", "ratio": 1.4}, {"shape": "no timing"}]))
    (bench / "b.json").write_text(json.dumps({"results": [{"name": "quantize", "speedup": 0.8}]}))
    (bench / "broken.json").write_text("{not json")
    recs = plots.speed_records(bench)
    assert [(r["label"], round(r["ratio"], 3)) for r in recs] == [("4096×4096 16 tok", 2.0), ("14336x4096", 1.4),
                                                                   ("quantize", 0.8)]
    assert is_png(plots.speedup_chart(bench, tmp_path))


def test_flatness_curves(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, :2] *= 50
    w = torch.randn(96, 32, generator=g)
    h = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    s = x.abs().amax(0).sqrt()
    fig = plots.flatness_curves({"original": x, "smoothquant": x / s, "hadamard": x @ h},
                                {"original": w, "smoothquant": w * s, "hadamard": w @ h})
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    assert len(fig.axes[1].lines[0].get_xdata()) == 32                # one point per input channel
    assert list(plots.channel_max(x)[:2]) == sorted(plots.channel_max(x), reverse=True)[:2]
    assert is_png(plots.save(fig, tmp_path / "flatness.png"))


def test_paper_table_from_run_files_has_fp16_first_the_qa_average_and_a_caption(tmp_path):
    """`python -m analysis.tables --from-json A B --paper` (the GPU DAG's tables stage): one table, rows FP16 then
    method-weight quantizer, ppl and the six QA accuracies with their mean, captioned with schedule and GPU."""
    import json

    from analysis.tables import QA_TASKS, main

    tasks = {t: 0.4 + 0.01 * i for i, t in enumerate(QA_TASKS)}
    for folder, method, wquant, ppl, shift in (("a", "fp16", "rtn", 21.6, 0.1), ("a", "rtn", "rtn", 11771.0, 0.0),
                                               ("b", "flatquant", "rtn", 29.3, 0.05), ("b", "flatquant", "gptq", 28.0, 0.06)):
        metrics = {"eval_ppl/wikitext2/ppl": ppl, "eval_ppl/wikitext2/ppl_fp": 21.6}
        metrics |= {f"eval_qa/{t}/acc": v + shift for t, v in tasks.items()}
        cfg = {"model": {"name": "smollm2_135m"}, "method": {"name": method}, "wquant": wquant, "seed": 0,
               "quant": {"w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4},
               "calib": {"nsamples": 128, "seqlen": 2048, "epochs": 15}, "eval": {"seqlen": 2048, "max_windows": None, "qa_limit": None}}
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{method}-{wquant}.json").write_text(json.dumps({"config": cfg, "metrics": metrics, "device": "NVIDIA H200"}))
    paths = main(["--from-json", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t"), "--paper"])
    text = (tmp_path / "t" / "paper.md").read_text()
    caption, table = text.split("\n\n", 1)
    assert "smollm2_135m, W4A4KV4" in caption and "128 × 2048" in caption and "15 epochs" in caption
    assert "windows of 2048 tokens: all" in caption and "run on NVIDIA H200" in caption
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["FP16", "RTN", "SmoothQuant-RTN", "QuaRot-RTN", "FlatQuant-RTN", "RTN-GPTQ",
                                               "SmoothQuant-GPTQ", "QuaRot-GPTQ", "FlatQuant-GPTQ"]  # the paper's rows
    assert "No finished run behind SmoothQuant-RTN, QuaRot-RTN, RTN-GPTQ, SmoothQuant-GPTQ, QuaRot-GPTQ." in caption
    assert rows[1][1] == "> 1000 (destroyed)" and "11771.00" in (tmp_path / "t" / "paper.csv").read_text()
    fp = rows[0]
    assert fp[1] == "21.60" and float(fp[-1].strip(" |")) == pytest.approx(100 * (sum(tasks.values()) / 6 + 0.1), abs=0.01)
    assert (tmp_path / "t" / "paper.png").stat().st_size > 10_000 and len(paths) == 3


def test_tables_have_captions_mark_destroyed_models_average_seeds_and_explain_empty_qa(tmp_path):
    """What `dvc repro` commits: a caption (model, bits, schedule, windows, device), FP16 first, a ppl above 1000 as
    destroyed, a trained row over three seeds as mean ± std, and a QA table without numbers that says why."""
    import json
    import statistics

    from analysis.tables import main

    runs = tmp_path / "runs"
    runs.mkdir()
    base = {"model": {"name": "smollm2_135m"}, "quant": {"w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4},
            "calib": {"nsamples": 8, "seqlen": 512, "epochs": 4}, "eval": {"seqlen": 2048, "max_windows": 4, "qa_limit": None}}
    flat = {0: 74.9, 1: 80.1, 2: 77.0}
    for i, (method, seed, ppl) in enumerate([("rtn", 0, 10938.8), *(("flatquant", s, v) for s, v in flat.items())]):
        blob = {"config": {**base, "method": {"name": method}, "wquant": "rtn", "seed": seed},
                "metrics": {"eval_ppl/wikitext2/ppl": ppl, "eval_ppl/wikitext2/ppl_fp": 24.15},
                "device": "CPU (2 cores)", "start_time": i}
        (runs / f"{method}-{seed}.json").write_text(json.dumps(blob))
    main(["--from-json", str(runs), "--out", str(tmp_path / "t")])
    ppl = (tmp_path / "t" / "ppl.md").read_text()
    caption, table = ppl.split("\n\n", 1)
    assert "calibration 8 × 512 tokens, 4 epochs" in caption and "the first 4" in caption and "CPU (2 cores)" in caption
    lines = table.splitlines()
    assert lines[2].startswith("| FP16 | 24.15")
    assert "| RTN | > 1000 (destroyed)" in table
    mean, std = statistics.mean(flat.values()), statistics.stdev(flat.values())
    assert f"| FlatQuant-RTN | {mean:.2f} ± {std:.2f} (3 seeds) |" in table and "C4" not in table  # no empty column
    qa = (tmp_path / "t" / "qa.md").read_text()
    assert "No run behind this table scored any zero-shot QA task" in qa and "| FP16" not in qa
    assert (tmp_path / "t" / "ppl.png").stat().st_size > 10_000


def test_perplexity_against_bits_and_per_layer_mse_by_method(tmp_path):
    """`--bits <folder>`: a table and plot of perplexity against bits, fewest bits (summed) first, one row per method, the
    main runs' bit width included; runs carrying per-layer MSE (run.py's "layers" series) give layer_mse.png."""
    import json

    import pandas as pd

    from analysis.tables import bits_table, json_frame, main

    main_runs, bits = tmp_path / "runs", tmp_path / "bits"
    main_runs.mkdir(), bits.mkdir()
    quant = {"w4a4kv4": (4, 4, 4), "w4a16": (4, 16, 16), "w8a8": (8, 8, 8)}
    ppl = {("rtn", "w4a4kv4"): 10938.8, ("flatquant", "w4a4kv4"): 74.9, ("quarot", "w4a4kv4"): 502.9, ("rtn", "w4a16"): 40.0,
           ("flatquant", "w4a16"): 27.0, ("rtn", "w8a8"): 25.0, ("flatquant", "w8a8"): 24.3}
    for i, ((method, q), value) in enumerate(ppl.items()):
        w, a, kv = quant[q]
        blob = {"config": {"model": {"name": "smollm2_135m"}, "method": {"name": method}, "wquant": "rtn", "seed": 0,
                           "quant": {"w_bits": w, "a_bits": a, "k_bits": kv, "v_bits": kv},
                           "calib": {"nsamples": 8, "seqlen": 512, "epochs": 4},
                           "eval": {"seqlen": 2048, "max_windows": 4, "qa_limit": None}},
                "metrics": {"eval_ppl/wikitext2/ppl": value, "eval_ppl/wikitext2/ppl_fp": 24.15},
                "layers": {"final_mse": [0.1 * (j + 1) * (10 if method == "rtn" else 1) for j in range(30)]},
                "device": "CPU (2 cores)", "start_time": i}
        (main_runs if q == "w4a4kv4" else bits).joinpath(f"{method}-{q}.json").write_text(json.dumps(blob))
    table = bits_table(pd.concat([json_frame(main_runs), json_frame(bits)], ignore_index=True))
    assert list(table.columns) == ["w4a4kv4", "w8a8kv8", "w4a16kv16"] and list(table.index) == ["RTN", "FlatQuant-RTN"]  # QuaRot: one width only
    assert table.loc["FlatQuant-RTN", "w4a16kv16"] == 27.0 and table.attrs["fp"] == 24.15
    paths = main(["--from-json", str(main_runs), "--bits", str(bits), "--out", str(tmp_path / "t")])
    text = (tmp_path / "t" / "ppl_bits.md").read_text()
    caption, body = text.split("\n\n", 1)
    assert "against bits" in caption and "W4A4KV4" not in caption and "4 epochs" in caption
    assert "| RTN | > 1000 (destroyed) | 25.00 | 40.00 |" in body and "| FlatQuant-RTN | 74.90 | 24.30 | 27.00 |" in body
    for name in ("ppl_bits.png", "layer_mse.png"):
        assert tmp_path / "t" / name in paths and (tmp_path / "t" / name).stat().st_size > 10_000


def test_speedup_bars_name_the_kernel_and_its_shape(tmp_path):
    """Rows as flatquant.kernels.bench and bench_layer write them: each bar says which linear, in→out features and
    tokens, or which layer phase and batch, not only a token count."""
    import json

    (tmp_path / "H200.json").write_text(json.dumps({"rows": [
        {"linear": "qkv", "in": 4096, "out": 6144, "tokens": 2048, "speedup": 1.2},
        {"linear": "down", "in": 14336, "out": 4096, "tokens": 1, "error": "boom"}]}))
    (tmp_path / "H200_layer.json").write_text(json.dumps({"rows": [{"phase": "prefill", "batch": 4, "speedup": 1.17}]}))
    labels = {r["label"]: r["ratio"] for r in plots.speed_records(tmp_path)}
    assert labels == {"qkv 4096→6144 2048 tok": 1.2, "layer prefill b4": 1.17}


def test_qa_spread_over_seeds_is_in_percent_like_the_accuracies(tmp_path):
    import json

    from analysis.tables import QA_TASKS, json_frame, qa_table, to_text

    for seed, acc in ((0, 0.50), (1, 0.54)):
        blob = {"config": {"model": {"name": "m"}, "method": {"name": "flatquant"}, "wquant": "rtn", "seed": seed,
                           "quant": {"w_bits": 4, "a_bits": 4, "k_bits": 4, "v_bits": 4}},
                "metrics": {f"eval_qa/{t}/acc": acc for t in QA_TASKS}, "start_time": seed}
        (tmp_path / f"{seed}.json").write_text(json.dumps(blob))
    text = to_text(qa_table(json_frame(tmp_path)))
    assert text.loc["FlatQuant-RTN", "m / piqa"] == "52.00 ± 2.83 (2 seeds)"
