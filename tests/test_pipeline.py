"""The Hydra + MLflow pipeline end to end on a tiny checkpoint, every config group, and bad input."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import shared_token_cache
from pipeline.runner import execute

CONF = str(Path(__file__).resolve().parents[1] / "conf")
FAST = ["calib.nsamples=2", "calib.seqlen=32", "calib.epochs=1", "calib.batch_size=2", "eval.seqlen=64", "eval.max_windows=2"]


def make_cfg(overrides, tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.artifacts_dir = str(tmp_path / "artifacts")
    cfg.data.cache_dir = str(shared_token_cache(tmp_path))
    return OmegaConf.to_container(cfg, resolve=True)


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_full_run_tracks_everything(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST], tmp_path)
    metrics = execute(cfg)
    printed = capsys.readouterr().out
    assert metrics["eval_ppl/wikitext2/ppl"] > 1 and metrics["eval_ppl/wikitext2/ppl_fp"] > 1
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("flatquant")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "flatquant" and run.data.params["quant.a_bits"] == "4"
    assert run.info.run_name == "tiny/flatquant/w4a4kv4/rtn/2x32x1ep/seed0"  # says model, method, bits, weights, schedule
    tags = run.data.tags
    assert {k: tags[k] for k in ("model", "method", "bits", "wquant", "schedule", "seed")} == {
        "model": "tiny", "method": "flatquant", "bits": "w4a4kv4", "wquant": "rtn", "schedule": "2x32x1ep", "seed": "0"}
    assert "| tiny | flatquant |" in tags["mlflow.note.content"]  # the summary is the run's description
    assert f"MLflow run {run.info.run_id}" in printed and f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in printed
    by_layer = client.get_metric_history(run.info.run_id, "calibrate/by_layer/final_mse")
    assert sorted(m.step for m in by_layer) == [0, 1]  # one series, the layer as its step
    assert run.data.metrics["calibrate/max_final_mse"] == pytest.approx(max(m.value for m in by_layer))
    assert not [k for k in run.data.metrics if k in ("calibrate/final_mse", "calibrate/init_mse")]
    assert run.data.metrics["eval_ppl/wikitext2/ppl"] == pytest.approx(metrics["eval_ppl/wikitext2/ppl"])
    assert not [k for k in run.data.metrics if k.startswith("calibrate/layer_")]  # a few series, not one per layer
    from analysis.plots import loss_curves

    png = loss_curves(f"sqlite:///{tmp_path}/mlflow.db", run.info.run_id, tmp_path / "figs")  # from the logged store
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "summary.md", "calibration", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/layer_mse.png", "plots/flatness.png"} <= plots
    learned = {a.path for a in client.list_artifacts(run.info.run_id, "calibration")}
    assert "calibration/layer_000.safetensors" in learned


def test_run_with_layers_left_on_disk_gives_the_same_numbers(tiny_llama_dir, tmp_path, monkeypatch):
    """offload=disk (layers read from the safetensors file when used) changes where weights live, not results."""
    monkeypatch.chdir(tmp_path)
    base = [f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST, "tracking.enabled=false"]
    eager = execute(make_cfg(base, tmp_path))
    (tmp_path / ".cache").rename(tmp_path / ".cache_eager")  # no cached FP baseline: evaluate it streamed too
    lazy = execute(make_cfg([*base, "offload=disk", "artifacts_dir=" + str(tmp_path / "artifacts_disk")], tmp_path))
    for key in ("eval_ppl/wikitext2/ppl", "eval_ppl/wikitext2/ppl_fp"):
        assert lazy[key] == eager[key]


def test_failed_run_is_marked_failed(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", "method=rtn", *FAST, "eval.seqlen=10000000"], tmp_path)
    with pytest.raises(ValueError, match="fewer than one window"):
        execute(cfg)
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("flatquant").experiment_id])
    assert run.info.status == "FAILED"


def test_eval_prompts_are_generated_and_logged(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """eval.prompts: the quantized model's greedy continuations (through the 4-bit cache) are printed, logged to the
    run as generations.json and written beside the metrics JSON."""
    import json

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "m.json"
    cfg = make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST, "eval.prompts=[hello world,the cat]",
                    "eval.max_new_tokens=3", f"+metrics_out={out}"], tmp_path)
    metrics = execute(cfg)
    texts = json.loads(out.with_suffix(".generations.json").read_text())
    assert list(texts) == ["hello world", "the cat"] and metrics["eval_generate/seconds"] > 0
    printed = capsys.readouterr().out
    assert all(f"{p!r} → {t!r}" in printed for p, t in texts.items())
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("flatquant").experiment_id])
    assert "generations.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_sixteen_bit_rtn_changes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", "method=rtn", "quant=fp16", *FAST], tmp_path)
    metrics = execute(cfg)
    assert metrics["eval_ppl/wikitext2/ppl"] == pytest.approx(metrics["eval_ppl/wikitext2/ppl_fp"], rel=1e-5)


GROUPS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml")) for g in ("model", "quant", "method", "data", "calib", "eval", "tracking", "bench", "experiment")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_option_composes_and_validates(group, option, tmp_path):
    from pipeline.context import Context

    cfg = make_cfg([f"{group}={option}"], tmp_path)
    if group == "model" and option != "smollm2":
        assert cfg["model"]["path"] == "???"  # needs the user's local checkpoint
        return
    Context(cfg)  # validates quant, method, calib, model dtype


def test_the_experiment_not_the_model_decides_the_schedule(tmp_path):
    """Choosing a model keeps the schedule (issue 13); experiment=paper is the reference one, and the command line
    still wins over an experiment."""
    import yaml

    quick, reference = (yaml.safe_load((Path(CONF) / "calib" / f"{n}.yaml").read_text()) for n in ("quick", "reference"))
    runs = {tuple(o): make_cfg(o, tmp_path) for o in ([], ["model=llama3_8b"], ["experiment=paper"],
                                                      ["experiment=paper", "model=llama3_8b", "calib.epochs=2"])}
    assert runs[()]["calib"] == runs[("model=llama3_8b",)]["calib"] == quick
    assert runs[("experiment=paper",)]["calib"] == reference and runs[("experiment=paper",)]["eval"]["max_windows"] is None
    assert runs[("experiment=paper", "model=llama3_8b", "calib.epochs=2")]["calib"] == {**reference, "epochs": 2}


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.w_bits=1", "quant.w_bits must be an integer in 2..16, got 1"),
        ("quant.a_bits=32", "quant.a_bits must be an integer in 2..16, got 32"),
        ("model=llama3_8b", "model.path is not set"),
        ("model.path=/no/such/model", "model.path='/no/such/model' does not exist"),
        ("model.dtype=int8", "model.dtype must be one of"),
        ("stage=train", "stage='train' is not one of"),
        ("method.alpha=-1", None),
        ("offload=sometimes", "offload must be auto, true, false or disk, got 'sometimes'"),
        ("offload=disk", "offload=disk reads a local safetensors checkpoint folder"),
        ("kernels=maybe", "kernels must be true or false, got 'maybe'"),
        ("kernels=true", "kernels=true runs the W4A4 Triton kernels, which need a CUDA GPU"),
        ("quant=w8a8", None),
        ("eval.max_windows=0", "eval.max_windows must be a positive integer, or null for every window, got 0"),
        ("eval.batch_size=0", "eval.batch_size must be a positive integer, got 0"),
        ("eval.seqlen=1", "eval.seqlen must be an integer >= 2"),
        ("calib.nsamples=0", "calib.nsamples must be a positive integer"),
        ("calib.seqlen=1", "calib.seqlen must be an integer >= 2"),
        ("seed=abc", "seed must be a non-negative integer, got 'abc'"),
        ("data.join=lines", "data.join must be one of ['hf', 'raw'], got 'lines'"),
        ("tracking.uri=./mlruns", "a plain folder is MLflow's deprecated file store"),
        ("tracking.uri=foo://bar", "tracking.uri must be sqlite:///"),
    ],
)
def test_bad_config_fails_at_once_naming_key_and_value(override, message, tmp_path, monkeypatch):
    import torch

    if override == "kernels=true" and torch.cuda.is_available():
        pytest.skip("a GPU is present: kernels=true is valid")
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([override], tmp_path)
    if override.startswith("tracking.uri="):  # make_cfg points tracking at the test's store: put it back
        cfg["tracking"]["uri"] = override.split("=", 1)[1]
    if message is None:
        return
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        execute(cfg)
    assert not (tmp_path / "artifacts").exists()  # nothing was written before the check


def test_unknown_method_is_rejected_by_hydra(tmp_path):
    with pytest.raises(Exception, match="method/nosuch"):
        make_cfg(["method=nosuch"], tmp_path)


def test_bench_stage_needs_only_shapes_and_says_when_no_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(["stage=bench", "model=llama3_8b"], tmp_path)  # no model.path: shapes come from the config
    assert cfg["model"]["shape"]["intermediate"] == 14336
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the stage would run the benchmark")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        execute(cfg)


def test_kernels_refuse_quant_settings_they_cannot_run(tmp_path, monkeypatch):
    from pipeline.context import Context

    cfg = make_cfg(["quant=w8a8", "kernels=true", "model.dtype=float16"], tmp_path)
    monkeypatch.setattr("pipeline.context.pick_device", lambda name: "cuda")  # as on a GPU machine
    with pytest.raises(ValueError, match="4-bit symmetric per-channel weights"):
        Context(cfg)
    cfg = make_cfg(["method=fp16", "quant=fp16", "kernels=true", "model.dtype=float16"], tmp_path)
    with pytest.raises(ValueError, match="kernels=true"):
        Context(cfg)
    with pytest.raises(ValueError, match="model.dtype=float16 or bfloat16"):
        Context(make_cfg(["kernels=true", "model.dtype=float32"], tmp_path))


@pytest.mark.parametrize("offload,free_gib,expect", [("auto", 80, False), ("auto", 10, True), (True, 80, True), (False, 10, False)])
def test_offload_auto_streams_layers_only_when_the_model_does_not_fit(offload, free_gib, expect, tmp_path, monkeypatch):
    import torch

    from pipeline.context import Context

    ctx = Context(make_cfg([], tmp_path) | {"offload": offload})
    ctx.device = "cuda"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, 80 * 2**30))
    assert ctx.wants_offload(16 * 2**30) is expect  # a 16 GB model (an 8B in bf16)
    ctx.device = "cpu"
    assert ctx.wants_offload(16 * 2**30) is False  # nothing to stream to


def test_one_calibration_store_for_both_weight_quantizers_and_any_eval(tiny_llama_dir, tmp_path, monkeypatch):
    """The store is keyed by what decides the learned parameters only: wquant=gptq after wquant=rtn resumes every
    layer (and gives another model), and eval-only or placement changes never recalibrate; a schedule change does."""
    from pipeline.context import Context

    monkeypatch.chdir(tmp_path)
    base = [f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST, "tracking.enabled=false"]
    rtn = execute(make_cfg([*base, "wquant=rtn"], tmp_path))
    gptq = execute(make_cfg([*base, "wquant=gptq", "gptq.percdamp=0.05", "eval.max_windows=1", "calib.storage=cpu"], tmp_path))
    assert rtn["calibrate/resumed_layers"] == 0 and gptq["calibrate/resumed_layers"] == 2
    assert gptq["eval_ppl/wikitext2/ppl"] != rtn["eval_ppl/wikitext2/ppl"]
    dirs = {Context(make_cfg([*base, *extra], tmp_path)).calib_dir for extra in
            ([], ["wquant=gptq"], ["kernels=false", "export=true"], ["data.eval_datasets=[wikitext2,c4]"], ["offload=true"],
             ["model.gguf_cache=/elsewhere"])}
    assert len(dirs) == 1
    assert Context(make_cfg([*base, "calib.epochs=2"], tmp_path)).calib_dir not in dirs
    assert Context(make_cfg([*base, "data.join=raw"], tmp_path)).calib_dir not in dirs


def test_gpu_out_of_memory_names_what_to_change(tiny_llama_dir, tmp_path, monkeypatch):
    import pipeline.calibrate as stage

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "quantize_model", oom)
    with pytest.raises(RuntimeError, match=r"calib\.storage=cpu.*calib\.nsamples.*offload=true.*resumes"):
        execute(make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST, "tracking.enabled=false"], tmp_path))


def test_metrics_out_folder_names_the_file_after_the_run(tiny_llama_dir, tmp_path, monkeypatch):
    """+metrics_out=<folder>/ (what a sweep uses) writes <model>-<method>-<bits>-<wquant>.json with stage times."""
    import json

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([f"model.path={tiny_llama_dir}", "model.name=tiny", *FAST, "tracking.enabled=false", "method=rtn",
                    f"+metrics_out={tmp_path}/runs/"], tmp_path)
    metrics = execute(cfg)
    blob = json.loads((tmp_path / "runs" / "tiny-rtn-w4a4kv4-rtn.json").read_text())
    assert blob["metrics"]["eval_ppl/wikitext2/ppl"] == metrics["eval_ppl/wikitext2/ppl"]
    stages = {k for k in blob["metrics"] if k.startswith("time/")}
    assert {"time/prepare_data_seconds", "time/eval_ppl_baseline_seconds", "time/calibrate_seconds", "time/eval_ppl_seconds"} <= stages
    assert sum(blob["metrics"][k] for k in stages) <= blob["metrics"]["run/wall_seconds"]


@pytest.mark.parametrize("calib", ["reference", "quick"])
def test_calib_config_is_built_from_its_group(calib, tmp_path):
    """CalibConfig.from_group takes every training key of the calib group (and the gptq group) by name: the result
    equals the one written out field by field, a store key is the same, and an unknown key is refused by name."""
    from flatquant.calibrate import CalibConfig

    cfg = make_cfg([f"calib={calib}", "wquant=gptq", "gptq.blocksize=64", "seed=3"], tmp_path)
    c, g = cfg["calib"], cfg["gptq"]
    built = CalibConfig.from_group(c, g, seed=3, device="cpu", wquant="gptq")
    by_hand = CalibConfig(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], clip_lr_mult=c["clip_lr_mult"],
                          seed=3, device="cpu", amp=c["amp"], storage=c["storage"], wquant="gptq", gptq_blocksize=64,
                          gptq_percdamp=g["percdamp"], gptq_act_order=g["act_order"], layer_mse=c["layer_mse"])
    assert built == by_hand
    with pytest.raises(ValueError, match="unknown calib/gptq keys \\['epoch'\\]"):
        CalibConfig.from_group({**c, "epoch": 3}, g, seed=3, device="cpu", wquant="gptq")
