"""Entry point: `python train.py method=wasi model=vit_b32` (see README for the config groups).

A wrong setting or a failed run ends with one line on stderr (exit status 2 or 1) and its traceback
in the run folder's train.log (experiments/training/errors.py)."""
import hydra
from omegaconf import DictConfig

from experiments.training import errors


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    with errors.logged():
        from experiments.run import run  # here, so --help and a mistyped override answer before timm loads

        return run(cfg)["val/acc"]  # what sweepers (e.g. Optuna) optimise: never the test split


if __name__ == "__main__":
    errors.main(main)
