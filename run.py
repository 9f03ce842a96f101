"""Entry point: compose conf/ with Hydra and run one tracked job (or a sweep with -m).

    python run.py                                   # the whole job on the embedded default, on the CPU
    python run.py experiment=paper model=llama3_8b quant=w4a4kv4   # a real model at the paper's schedule (set
                                                                   # model.path or its env variable)
    python run.py -m method=rtn,flatquant           # one MLflow run per combination
    python run.py -m hydra/launcher=joblib method=rtn,quarot,flatquant   # one worker per GPU
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.gpu import claim_gpu
from pipeline.runner import execute

log = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and hc.launcher._target_.endswith("JoblibLauncher"):
        claim_gpu()  # joblib workers are long-lived processes: each keeps one GPU (pipeline/gpu.py says why)
    choices = hc.runtime.choices
    if choices.get("calib") == "quick" and choices.get("model") != "smollm2" and cfg.stage != "bench":
        log.warning("calib=quick (experiment=%s) on model=%s: the CPU-sized schedule of the embedded default (%d x %d "
                    "calibration tokens, %d epochs); experiment=paper runs the paper's", choices.get("experiment"),
                    choices.get("model"), cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.epochs)
    try:
        metrics = execute(OmegaConf.to_container(cfg, resolve=True))
    except Exception:
        if hc.mode != RunMode.MULTIRUN:
            raise
        log.exception("job %s failed (its MLflow run is marked FAILED); the sweep goes on", hc.job.override_dirname)
        return None
    return metrics.get("eval_ppl/wikitext2/ppl")


if __name__ == "__main__":
    main()
