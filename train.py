"""Entry point: `python train.py method=wasi model=vit_b32` (see README for the config groups)."""
import hydra
from omegaconf import DictConfig

from experiments.run import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)["val/acc"]  # what sweepers (e.g. Optuna) optimise: never the test split


if __name__ == "__main__":
    main()
