"""One calibration split over processes (calib.layers, calib.workers): the same layers as one process, one
evaluation, a shared store whose manifest concurrent workers never corrupt."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_llama, shared_token_cache
from pipeline.runner import execute
from test_pipeline import FAST, make_cfg

ROOT = Path(__file__).resolve().parents[1]
PPL = "eval_ppl/wikitext2/ppl"


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, smollm2):
    model = random_llama(layers=4, vocab=len(smollm2[1]))
    path = tmp_path_factory.mktemp("four_layers")
    model.save_pretrained(path)
    smollm2[1].save_pretrained(path)
    return path


def _store(root: Path) -> dict:
    (manifest,) = (root / "artifacts" / "calib").glob("*/manifest.json")
    return {i: e["sha256"] for i, e in json.loads(manifest.read_text())["layers"].items()}


@pytest.mark.parametrize("wquant", ["rtn", "gptq"])
def test_two_workers_store_the_layers_one_process_does_and_evaluate_once(four_layer_dir, tmp_path, monkeypatch, wquant):
    """Worker 0 then worker 1 of 2 (as `-m calib.workers=2 'calib.worker=range(2)'` runs them on one machine): each
    trains its two layers; worker 0 stops after its share; worker 1 saves the last layer and evaluates, with the
    perplexity of one process; every stored layer is bitwise the one-process layer. A worker run again trains
    nothing, and since all layers are there, worker 0 evaluates, with the same result."""
    base = [f"model.path={four_layer_dir}", "model.name=four", *FAST, "calib.epochs=2", "tracking.enabled=false",
            f"wquant={wquant}"]
    one, split = tmp_path / "one", tmp_path / "split"
    monkeypatch.chdir(tmp_path)
    whole = execute(make_cfg([*base, f"artifacts_dir={one / 'artifacts'}"], one))
    first = execute(make_cfg([*base, "calib.workers=2", "calib.worker=0"], split))
    assert first["calibrate/range_trained_layers"] == 2 and first["calibrate/stored_layers"] == 2
    assert PPL not in first  # not evaluated: two layers are missing
    last = execute(make_cfg([*base, "calib.workers=2", "calib.worker=1"], split))
    assert last["calibrate/range_trained_layers"] == 2 and last["calibrate/resumed_layers"] == 4
    assert last[PPL] == whole[PPL]
    assert _store(split) == _store(one)  # same files, checksum for checksum
    again = execute(make_cfg([*base, "calib.workers=2", "calib.worker=0"], split))
    assert again["calibrate/range_trained_layers"] == 0 and again[PPL] == whole[PPL]


def test_layer_ranges_by_hand_fill_the_same_store(four_layer_dir, tmp_path, monkeypatch):
    """calib.layers=START:END: 2:4 first (layers 0–1 only carry the FP activations forward), then 0:2, which saves
    the last missing layer and evaluates."""
    base = [f"model.path={four_layer_dir}", "model.name=four", *FAST, "tracking.enabled=false"]
    monkeypatch.chdir(tmp_path)
    whole = execute(make_cfg([*base, f"artifacts_dir={tmp_path / 'one' / 'artifacts'}"], tmp_path / "one"))
    tail = execute(make_cfg([*base, "calib.layers=2:4"], tmp_path / "s"))
    head = execute(make_cfg([*base, "calib.layers=0:2"], tmp_path / "s"))
    assert PPL not in tail and head[PPL] == whole[PPL]
    assert _store(tmp_path / "s") == _store(tmp_path / "one")


@pytest.mark.parametrize("bad,match", [(["calib.workers=2", "calib.worker=2"], "calib.worker must be in 0..1"),
                                       (["calib.layers=3:1"], "START:END"), (["calib.layers=abc"], "START:END"),
                                       (["calib.layers=0:9"], "has 4 decoder layers"),
                                       (["calib.workers=2", "calib.layers=0:2"], "set one of them"),
                                       (["calib.workers=0"], "calib.workers must be")])
def test_bad_splits_are_refused_with_the_setting_named(four_layer_dir, tmp_path, monkeypatch, bad, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        execute(make_cfg([f"model.path={four_layer_dir}", "model.name=four", *FAST, "tracking.enabled=false", *bad], tmp_path))


def _save_many(root: str, key: str, layers: list[int]) -> None:
    from flatquant.calibrate import LayerReport, LayerStore

    store = LayerStore(root, key)  # read before the other process wrote anything
    for i in layers:
        store.save(i, {"w": torch.full((64,), float(i))}, LayerReport(i))


def test_concurrent_workers_keep_every_manifest_entry(tmp_path):
    """Two processes saving different layers of one store at the same time: the manifest lists all 40."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(str(tmp_path), "k", list(range(w, 40, 2)))) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    from flatquant.calibrate import LayerStore

    store = LayerStore(tmp_path, "k")
    assert sorted(map(int, store.manifest["layers"])) == list(range(40))
    assert all(store.load(i)[0]["w"][0].item() == i for i in range(40))  # every checksum holds


def test_one_command_splits_over_workers(four_layer_dir, tmp_path):
    """`python run.py -m calib.workers=2 'calib.worker=range(2)'`: two jobs, one metrics file (the evaluating
    worker's), two MLflow runs named for their worker."""
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"model.path={four_layer_dir}", "model.name=four", *FAST,
           "calib.workers=2", "calib.worker=range(2)", f"artifacts_dir={tmp_path / 'a'}", f"data.cache_dir={shared_token_cache(tmp_path)}",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"+metrics_out={tmp_path}/m/", f"hydra.sweep.dir={tmp_path}/multirun"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "m").glob("*.json")
    m = json.loads(out.read_text())["metrics"]
    assert m["calibrate/resumed_layers"] == 4 and m[PPL] > 0
    assert "layers 0:2 of 4 calibrated" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("flatquant").experiment_id])
    names = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert [n.rsplit("/", 1)[1] for n in names] == ["worker0of2", "worker1of2"]
