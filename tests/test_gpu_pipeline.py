"""`python run.py` end to end on a CUDA GPU, as users run it: every stage, method and weight quantizer, a `-m`
sweep, kernels=true, offload=true, export=true (and load_quantized of the export), a killed run that resumes, and
one calibration split over two workers.

Short schedule on the embedded default (SmolLM2-135M, fp16); on one H200 the file took 11:52 beside a
reference-schedule calibration and six QA runs sharing the GPU. The model is
`FLATQUANT_SMOLLM2_PATH` (a path to its GGUF) or the installed package; tracking goes to a SQLite store in the
test's folder when mlflow imports, else it is off. Skipped without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["device=cuda", "model.dtype=float16", "calib.nsamples=4", "calib.seqlen=256", "calib.epochs=1",
         "calib.batch_size=2", "eval.max_windows=4"]
METHODS = ("fp16", "rtn", "smoothquant", "quarot", "flatquant")
LAYERS = 30


def _mlflow_missing() -> str:
    """Why mlflow does not import here ('' when it does): a carried wheel closure that lacks a dependency fails deep
    inside mlflow's import (lazy-importer, once), and the skip should say so."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _tracking_on() -> bool:
    return not _mlflow_missing()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_pipeline")


def run_py(work: Path, *overrides: str, check: bool = True, popen: bool = False, artifacts: Path | None = None):
    """`python run.py <overrides>` in `work` (its own artifacts, results, token cache and MLflow store)."""
    args = [sys.executable, str(ROOT / "run.py"), *overrides, f"artifacts_dir={artifacts or work / 'artifacts'}",
            f"results_dir={work / 'results'}", f"data.cache_dir={work / 'tokens'}"]
    if not _tracking_on():
        args.append("tracking.enabled=false")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"run.py {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def metrics(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())["metrics"]


@pytest.fixture(scope="module")
def sweep(work) -> dict[tuple[str, str], dict]:
    """One `-m` sweep over every method × weight quantizer (10 runs); {(method, wquant): metrics}."""
    run_py(work, "-m", f"method={','.join(METHODS)}", "wquant=rtn,gptq", *SHORT,
           "+metrics_out=runs/${method.name}-${wquant}.json")
    return {(m, w): metrics(work / "runs" / f"{m}-{w}.json") for m in METHODS for w in ("rtn", "gptq")}


PPL = "eval_ppl/wikitext2/ppl"


def test_sweep_runs_every_method_and_weight_quantizer(sweep, work):
    fp = sweep[("fp16", "rtn")][f"{PPL}_fp"]
    assert 15 < fp < 40  # SmolLM2-135M on 4 windows of WikiText-2 test (fp16 21.6 on all 148)
    for (method, wquant), m in sweep.items():
        assert m[f"{PPL}_fp"] == pytest.approx(fp, rel=1e-6), (method, wquant)  # one FP model, evaluated once
        assert math.isfinite(m[PPL]), (method, wquant)
        if method == "fp16":
            assert m[PPL] == pytest.approx(fp, rel=1e-6)
        else:
            assert m[PPL] > fp, (method, wquant)  # 4-bit weights, activations and KV cost perplexity
        assert m["time/eval_ppl_seconds"] > 0 and m["run/wall_seconds"] > 0
    # FlatQuant beats plain RTN by orders of magnitude even on a 1-epoch schedule; GPTQ helps the learned transforms
    assert sweep[("flatquant", "rtn")][PPL] < sweep[("rtn", "rtn")][PPL] / 10
    assert sweep[("flatquant", "gptq")][PPL] < sweep[("flatquant", "rtn")][PPL] * 1.05


def test_one_calibration_serves_both_weight_quantizers(sweep):
    """The store is not keyed by wquant: of the two FlatQuant runs one trains, the other resumes every layer."""
    resumed = sorted(sweep[("flatquant", w)]["calibrate/resumed_layers"] for w in ("rtn", "gptq"))
    assert resumed == [0, LAYERS]


def test_sweep_is_tracked(sweep, work):
    if why := _mlflow_missing():
        pytest.skip(f"mlflow does not import here ({why})")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flatquant")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 * len(METHODS) and all(r.info.status == "FINISHED" for r in children)
    flat = [r for r in children if r.data.params["method.name"] == "flatquant" and r.data.params["wquant"] == "gptq"]
    assert flat[0].data.metrics[PPL] == pytest.approx(sweep[("flatquant", "gptq")][PPL])


def test_calibrate_stage_then_eval_on_the_kernels(sweep, work):
    """stage=calibrate (+export) then stage=eval kernels=true reuse the sweep's store: no layer is trained again;
    the W4A4 kernels are no worse than fake quantization (+5 %); load_quantized of the export, on the GPU,
    gives the fake-quant perplexity of the run.

    Why 5 %: at 4 bits a rounding difference anywhere upstream can flip an activation code (a step of
    max|x|/7), and this 1-epoch model amplifies such flips over 30 layers, either way. On one H200 (fp16, these
    settings): seed 0 fake 109.85, kernels 112.55 (+2.5 %), and the same kernels with the fused RMSNorm replaced by
    its PyTorch reference (equal but for the order of the sum of squares) 109.22 (−0.6 %); seed 1 fake 101.97,
    kernels 98.01 (−3.9 %); an earlier build: seed 7 97.38 against 100.37. A broken kernel gives hundreds or more.
    One-sided because the kernels round fewer intermediates to 16 bits than fake quantization. The accuracy claim
    is measured at the reference schedule (29.32 against 29.27, +0.17 %) and per linear group by
    test_kernel_groups_are_not_less_accurate_than_fake_quant."""
    base = ["method=flatquant", "wquant=rtn", *SHORT]
    run_py(work, *base, "stage=calibrate", "export=true", "+metrics_out=stage_calibrate.json")
    cal = metrics(work / "stage_calibrate.json")
    assert cal["calibrate/resumed_layers"] == LAYERS and cal["export/bytes"] > 0
    run_py(work, *base, "stage=eval", "kernels=true", "+metrics_out=stage_eval.json")
    ev = metrics(work / "stage_eval.json")
    fake = sweep[("flatquant", "rtn")][PPL]
    assert ev["calibrate/resumed_layers"] == LAYERS
    assert ev[f"{PPL}_fp"] < ev[PPL] <= fake * 1.05

    from flatquant.data import eval_windows, load_tokens
    from flatquant.evaluate import perplexity
    from flatquant.export import load_quantized

    (out,) = (work / "artifacts" / "quantized").glob("smollm2_135m_flatquant_*_rtn")
    model, tok = load_quantized(out, "cuda")  # fp16 outside the decoder layers, as exported
    windows = eval_windows(load_tokens(tok, "wikitext2", "test", os.environ.get("FLATQUANT_DATA"), None), 2048, 4)
    assert perplexity(model, windows, "cuda") == pytest.approx(fake, rel=1e-3)


def test_offloaded_layers_give_the_same_numbers(sweep, work):
    """offload=true streams the decoder layers from pinned CPU memory: same perplexity as the resident model."""
    run_py(work, "method=flatquant", "wquant=gptq", "offload=true", *SHORT, "+metrics_out=offload.json")
    m = metrics(work / "offload.json")
    assert m["calibrate/resumed_layers"] == LAYERS
    assert m[PPL] == pytest.approx(sweep[("flatquant", "gptq")][PPL], rel=1e-3)
    assert m[f"{PPL}_fp"] == pytest.approx(sweep[("flatquant", "gptq")][f"{PPL}_fp"], rel=1e-6)


def test_bfloat16_model_on_the_kernels(work):
    """model.dtype=bfloat16: every tensor a stage makes follows the model's dtype. A bf16 FlatQuant run (its own
    store: the model's dtype is part of the key), then stage=eval on the kernels from that store: no worse than
    fake quantization (+5 %, the bound of test_calibrate_stage_then_eval_on_the_kernels, which says why), and still
    above the FP model's.

    Not two-sided: bf16 keeps 8 significant bits to fp16's 11, and this 1-epoch model amplifies
    rounding. On one H200 the kernels gave 96.89 against fake quantization's 102.16 — lower, as the kernels round
    fewer intermediates to bf16 (test_kernel_groups_are_not_less_accurate_than_fake_quant measures that per group).
    For scale, on a CPU the same kind of 1-epoch model (2 windows) gave 69.81 in float32 and 75.29 with its
    embeddings, residual stream and head in bf16 — 7.9 % from rounding alone, of which the linear groups (online
    transform, quantizer, GEMM) computed in float32 recover only 0.5 % (74.92). (bf16 against the fp16 runs is no
    test either: QuaRot-RTN at this schedule gave 600.8 in bf16 and 486.1 in fp16.)"""
    bf16 = ["method=flatquant", *SHORT, "model.dtype=bfloat16"]
    run_py(work, *bf16, "+metrics_out=bf16.json")
    run_py(work, *bf16, "stage=eval", "kernels=true", "+metrics_out=bf16_kernels.json")
    fake, kern = metrics(work / "bf16.json"), metrics(work / "bf16_kernels.json")
    assert fake["calibrate/resumed_layers"] == 0 and kern["calibrate/resumed_layers"] == LAYERS
    assert kern[f"{PPL}_fp"] < kern[PPL] <= fake[PPL] * 1.05


def test_bench_stage(work):
    run_py(work, "stage=bench", "bench.token_counts=[16,2048]", "bench.calibration=true", "bench.calibration_steps=4",
           "bench.profile=true", "bench.model=true", "bench.model_batches=[1,4]", "bench.model_context=[128,512]",
           "bench.model_max_tokens=512", "bench.model_steps=4", "bench.model_profile=true", "+metrics_out=bench.json")
    m = metrics(work / "bench.json")
    # the whole model (SmolLM2's shape): context × batch rows within 512 prompt tokens, decode eager and graphed
    rows = {k.split("/")[1] for k in m if k.startswith("bench/model_")}
    assert rows == {"model_c128_b1", "model_c128_b4", "model_c512_b1"}
    assert all(0.05 < m[f"bench/{r}/{k}"] < 50 for r in rows for k in ("prefill_speedup", "graph_decode_speedup"))
    (model,) = (work / "results" / "bench").glob("*_model_*.json")
    for row in json.loads(model.read_text())["rows"]:
        assert row["w4a4_graph_decode_ms_per_step"] < row["w4a4_decode_ms_per_step"]  # the graph removes launches
        assert 0.25 < row["kv_bytes_ratio"] < 0.35
        names = {t["kernel"] for t in row["w4a4_profile"]["top"]}  # a decode step's kernels, by GPU time
        assert {"_w4a4_gemm_kernel", "_decode_split_kernel", "_qkv_write_kernel"} <= names, names  # one write a step
        assert 0 < row["w4a4_profile"]["gpu_ms_total"] < row["w4a4_decode_ms_per_step"]
    speedups = {k: v for k, v in m.items() if k.endswith("/speedup")}
    assert speedups and not {k: v for k, v in speedups.items() if not 0.05 < v < 50}, speedups
    assert any(k.startswith("bench/layer_") for k in speedups)
    assert list((work / "results" / "bench").glob("*.json"))
    # calibration at SmolLM2's shape, reference schedule (32 steps per epoch, 15 epochs): 47 ms per step on an H100
    ms = m["bench/calibration/ms_per_step"]
    assert 1 < ms < 5000 and m["bench/calibration/s_per_layer"] == pytest.approx(ms / 1000 * 32 * 15)
    assert 0 < m["bench/calibration/peak_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    # the FP pass a split repeats is cheaper than a layer's training, so 8 workers over 30 layers beat one process
    assert 0 < m["bench/calibration/fp_forward_s_per_layer"] < m["bench/calibration/s_per_layer"]
    assert 1 < m["bench/calibration/split8/speedup"] <= 30 / 4
    (calib,) = (work / "results" / "bench").glob("*_calibration.json")
    cal = json.loads(calib.read_text())
    assert cal["steps_timed"] == 4 and cal["method"] == "flatquant"
    assert all(math.isfinite(cal[k]) and cal[k] > 0 for k in ("mse_before", "mse_after"))
    runs = ("fp16_b4_s2048", "w4a4_b4_s2048", "fp16_b16_s1", "w4a4_b16_s1")
    assert all(0 < m[f"bench/profile_{r}/gpu_ms"] < 1000 for r in runs)
    (profile,) = (work / "results" / "bench").glob("*_profile.json")
    top = json.loads(profile.read_text())["runs"]["w4a4_b4_s2048"]["top"]
    assert top and all(t["ms"] > 0 for t in top)
    assert {t["kernel"]: t["calls"] for t in top}.get("_w4a4_gemm_kernel") == 4  # one GEMM per linear group


def test_killed_run_resumes_at_the_next_layer(work):
    """SIGKILL mid-calibration, then the same command: the saved layers are reused, the run finishes."""
    cmd = ["method=flatquant", "seed=1", *SHORT, "calib.epochs=3", "+metrics_out=resumed.json"]
    proc = run_py(work, *cmd, popen=True)
    deadline, done = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        manifests = list((work / "artifacts" / "calib").glob("smollm2_135m_flatquant_*/manifest.json"))
        stores = [json.loads(p.read_text()) for p in manifests]
        done = max((len(s["layers"]) for s in stores if s["layers"] and _seed1(s)), default=0)
        if done >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < LAYERS, "the run ended before it could be killed mid-calibration"
    run_py(work, *cmd)
    m = metrics(work / "resumed.json")
    assert done <= m["calibrate/resumed_layers"] < LAYERS
    assert math.isfinite(m[PPL]) and m[PPL] > m[f"{PPL}_fp"]


def _seed1(store: dict) -> bool:
    """The store the seed=1 run writes (the sweep's stores hold all layers, trained with 1 epoch)."""
    return any(len(entry["report"]["epoch_losses"]) == 3 for entry in store["layers"].values())


def test_two_workers_on_one_gpu_match_one_process(work):
    """`-m calib.workers=2 'calib.worker=range(2)'` on one GPU, one worker after the other (a new seed: a new
    store), against one process with the same settings: the same perplexity within 1 % (GPU training is not
    bitwise reproducible; issue 17 asks 0.5 % at the reference schedule), one metrics file, worker 1 saving the last
    layer and evaluating."""
    cmd = ["method=flatquant", "seed=2", *SHORT]
    run_py(work, *cmd, "+metrics_out=split_one.json", artifacts=work / "one_process")
    run_py(work, "-m", *cmd, "calib.workers=2", "calib.worker=range(2)", "+metrics_out=split/")
    one = metrics(work / "split_one.json")
    (out,) = (work / "split").glob("*.json")
    split = metrics(out)
    assert split["calibrate/range_start"] == LAYERS // 2 and split["calibrate/range_trained_layers"] == LAYERS // 2
    assert split["calibrate/resumed_layers"] == LAYERS and split["calibrate/range_fp_forward_seconds"] > 0
    assert split[PPL] == pytest.approx(one[PPL], rel=0.01)
