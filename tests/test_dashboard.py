"""The MLflow dashboard a user opens: a real `mlflow server` over a store holding pipeline-shaped runs.

The store is written with MLflow's own client (params = the flattened config, metrics keyed
`<stage>/<dataset>/<metric>`), so no model is needed. The fast test checks the REST API the UI itself calls; the
slow one opens the runs comparison page in headless Chromium and saves a screenshot under results/plots/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

EXPERIMENT = "flatquant"
RUNS = {  # run name → (params, metrics)
    "smollm2_135m/rtn/w4a4kv4/rtn": ({"model.name": "smollm2_135m", "method.name": "rtn", "wquant": "rtn",
                                      "quant.w_bits": "4", "quant.a_bits": "4", "quant.k_bits": "4"},
                                     {"eval_ppl/wikitext2/ppl": 912.5, "eval_ppl/wikitext2/ppl_fp": 20.3}),
    "smollm2_135m/flatquant/w4a4kv4/rtn": ({"model.name": "smollm2_135m", "method.name": "flatquant",
                                            "wquant": "rtn", "quant.w_bits": "4", "quant.a_bits": "4",
                                            "quant.k_bits": "4", "method.alpha": "0.3"},
                                           {"eval_ppl/wikitext2/ppl": 31.7, "eval_ppl/wikitext2/ppl_fp": 20.3,
                                            "calibrate/mean_final_mse": 0.012}),
    "smollm2_135m/fp16/w16a16kv16/rtn": ({"model.name": "smollm2_135m", "method.name": "fp16", "wquant": "rtn",
                                          "quant.w_bits": "16", "quant.a_bits": "16", "quant.k_bits": "16"},
                                         {"eval_ppl/wikitext2/ppl": 20.3}),
}
ROOT = Path(__file__).resolve().parents[1]


def write_store(root: Path) -> tuple[str, dict[str, str]]:
    """SQLite store with RUNS (and per-layer loss histories on the FlatQuant run); returns (uri, name → run id)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    ids = {}
    for name, (params, metrics) in RUNS.items():
        run = client.create_run(exp, run_name=name)
        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, 0) for k, v in metrics.items()]
        if "flatquant" in name:
            ms += [Metric(f"calibrate/layer_{l:03d}/loss", 0.1 / (e + 1) / (l + 1), now + e, e)
                   for l in range(2) for e in range(4)]
        client.log_batch(run.info.run_id, metrics=ms, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    return uri, ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None, timeout: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.lstrip().startswith(("{", "[")) else text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, run ids, experiment id) of an `mlflow server` on a free loopback port; stopped afterwards."""
    root = tmp_path_factory.mktemp("dashboard")
    uri, ids = write_store(root)
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--artifacts-destination", (root / "mlartifacts").as_uri()]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if get(f"{base}/health", timeout=1) == "OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        exp = get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
        yield base, ids, exp["experiment_id"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its worker
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_runs_params_and_metrics_are_served(server):
    base, ids, exp_id = server
    found = get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in found}
    assert set(by_name) == set(RUNS)
    for name, (params, metrics) in RUNS.items():
        run = by_name[name]
        assert run["info"]["run_id"] == ids[name] and run["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == params
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == pytest.approx(
            {**metrics, **({"calibrate/layer_000/loss": 0.025, "calibrate/layer_001/loss": 0.0125}
                           if "flatquant" in name else {})})
    best = get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 1,
                                                      "filter": "params.`method.name` != 'fp16'",
                                                      "order_by": ["metrics.`eval_ppl/wikitext2/ppl` ASC"]})
    assert best["runs"][0]["info"]["run_name"] == "smollm2_135m/flatquant/w4a4kv4/rtn"
    q = urllib.parse.urlencode({"run_id": ids["smollm2_135m/flatquant/w4a4kv4/rtn"],
                                "metric_key": "calibrate/layer_000/loss"})
    history = get(f"{base}/api/2.0/mlflow/metrics/get-history?{q}")["metrics"]
    assert [m["step"] for m in history] == [0, 1, 2, 3]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
def test_compare_page_screenshot(server, tmp_path):
    """Headless Chromium renders the runs comparison page; the PNG lands in results/plots/ to look at."""
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium: apt-get install chromium")
    base, ids, exp_id = server
    runs = json.dumps(list(ids.values()), separators=(",", ":"))
    url = f"{base}/#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
    out = ROOT / "results" / "plots" / "mlflow_compare_runs.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--hide-scrollbars", "--window-size=1600,1100", "--virtual-time-budget=20000",
           f"--screenshot={out}", url]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert out.exists() and out.stat().st_size > 20_000, "screenshot missing or blank"
