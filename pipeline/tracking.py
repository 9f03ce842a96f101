"""MLflow tracking: the only module of the project that imports mlflow.

Usage:
    with Tracker(uri, "flatquant", run_name="smollm2/flatquant/w4a4kv4", config=flat_cfg) as tr:
        tr.metrics({"eval_ppl/wikitext2/ppl": 12.3})
        tr.artifact("artifacts/calib/abc/layer_000.safetensors", "calibration")
The run ends FINISHED, FAILED when the body raises, or KILLED when it is interrupted (Ctrl-C, or SIGTERM where
pipeline.runner turns it into an exception); the exception still propagates.
An unreachable remote server falls back to the local SQLite store, with a warning that says so.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from pipeline.interrupt import deferred

log = logging.getLogger(__name__)


def _reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3)
        return True
    except Exception:
        return False


class Tracker:
    def __init__(self, uri: str | None, experiment: str, run_name: str, config: dict, enabled: bool = True,
                 fallback_uri: str | None = None, tags: dict | None = None):
        self.enabled, self.uri, self.experiment = enabled, uri, experiment
        self.run_name, self.config, self.tags = run_name, config, tags or {}
        self.fallback_uri = fallback_uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        import mlflow

        uri = self.uri
        if not _reachable(uri):
            log.warning("MLflow server %s cannot be reached: logging to the local store %s instead", uri, self.fallback_uri)
            uri = self.fallback_uri
        self.uri = uri
        self.experiment_id = ensure_store(uri, self.experiment)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.experiment)
        nested = mlflow.active_run() is not None
        parent = os.environ.get("FLATQUANT_PARENT_RUN_ID")
        tags = dict(self.tags)
        if parent and not nested:
            tags["mlflow.parentRunId"] = parent
        with deferred():
            run = mlflow.start_run(run_name=self.run_name, nested=nested, tags=tags)
            self.run_id = run.info.run_id
            mlflow.log_params({k: str(v)[:500] for k, v in self.config.items()})
            mlflow.log_dict(self.config, "config.json")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.enabled and self.run_id:
            import mlflow

            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)  # SIGINT / SIGTERM
            with deferred(raise_after=False):
                mlflow.end_run(status="KILLED" if interrupted else "FAILED" if exc_type else "FINISHED")
        return False

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled and values:
            import mlflow

            with deferred():
                mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        path = Path(path)
        with deferred():
            if path.is_dir():
                mlflow.log_artifacts(str(path), folder)
            elif path.exists():
                mlflow.log_artifact(str(path), folder)

    def run_url(self, ui: str = "http://127.0.0.1:5000") -> str:
        """Where `mlflow ui` shows this run (the server's own address for a remote store)."""
        base = self.uri.rstrip("/") if self.uri and self.uri.startswith(("http://", "https://")) else ui
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def describe(self, markdown: str) -> None:
        """The run's description (shown at the top of its page in the UI)."""
        if self.enabled and self.run_id:
            import mlflow

            with deferred():
                mlflow.set_tag("mlflow.note.content", markdown)

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            import mlflow

            with deferred():
                mlflow.log_text(text, name)


def ensure_store(uri: str, experiment: str) -> str:
    """Create (and migrate) a SQLite store and the experiment once, under a file lock beside the database, so
    that runs starting together in a fresh folder (a parallel sweep, several jobs) never race MLflow's schema
    migration; returns the experiment id."""
    from mlflow.tracking import MlflowClient

    lock = None
    if uri.startswith("sqlite:///"):
        import fcntl

        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        return exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    finally:
        if lock is not None:
            lock.close()


def start_parent(uri: str, experiment: str, name: str) -> str:
    """Open the parent run of a sweep (left RUNNING while the children log) and return its id."""
    from mlflow.tracking import MlflowClient

    exp_id = ensure_store(uri, experiment)
    client = MlflowClient(uri)
    return client.create_run(exp_id, run_name=name, tags={"flatquant.sweep": "true"}).info.run_id


def end_parent(uri: str, experiment: str, run_id: str, table: str) -> None:
    """Close a sweep's parent run with its summary table; FAILED if any child failed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    failed = len(client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'FAILED'"))
    client.log_text(run_id, table, "sweep_summary.md")
    client.log_metric(run_id, "sweep/failed_jobs", failed)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to mlartifacts/ beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None
