"""Hydra callback for multiruns: one MLflow parent run per sweep, and the comparison table at its end.

Configured in conf/config.yaml under hydra.callbacks. Each job's run is tagged with the parent's id
(FLATQUANT_PARENT_RUN_ID, inherited by launcher workers). A failed job's run ends FAILED and the sweep
goes on (run.py logs the error instead of raising in a multirun); the table is built from the FINISHED
runs of this sweep, and the parent ends FAILED if any child did.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from pipeline import tracking

log = logging.getLogger(__name__)


def _uri(config) -> str:
    return config.tracking.uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class SweepCallback(Callback):
    def __init__(self):
        self.parent: str | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        if not config.tracking.enabled:
            return
        name = f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.parent = tracking.start_parent(_uri(config), config.tracking.experiment, name)
        os.environ["FLATQUANT_PARENT_RUN_ID"] = self.parent

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.parent is None:
            return
        from analysis.tables import latest, ppl_table, qa_table, runs_frame, to_markdown

        df = runs_frame(_uri(config), config.tracking.experiment, parent_run_id=self.parent)
        parts = [to_markdown(ppl_table(latest(df)))] if len(df) else ["(no run finished)"]
        if len(df) and any(c.startswith("eval_qa/") for c in df.columns):
            parts.append(to_markdown(qa_table(latest(df))))
        table = "\n\n".join(parts)
        out = Path(config.results_dir) / "sweeps" / f"sweep_{self.parent[:8]}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        print(f"\nSweep summary ({out}):\n{table}")
        tracking.end_parent(_uri(config), config.tracking.experiment, self.parent, table)
        os.environ.pop("FLATQUANT_PARENT_RUN_ID", None)
