"""Entry point: compose conf/ with Hydra and run one tracked job (or a sweep with -m).

    python run.py                                   # the whole job on the embedded default, on the CPU
    python run.py model=llama3_8b quant=w4a4kv4     # a real model (set model.path or its env variable)
    python run.py -m method=rtn,flatquant           # one MLflow run per combination
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.runner import execute


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = execute(OmegaConf.to_container(cfg, resolve=True))
    return metrics.get("eval_ppl/wikitext2/ppl")


if __name__ == "__main__":
    main()
