"""Fine-tuning methods as config-instantiated objects: `conf/method/<name>.yaml` names a class here.

A method does two things to a freshly built model: `apply` (convert layers, freeze parameters,
return a JSON-able summary) and `build_optimizer`. Adding a method is a new class and a YAML file.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

import wasi

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def freeze_except(model: nn.Module, trainable: list[str]) -> None:
    """requires_grad only for parameters of the named modules and of the classifier head."""
    keep = [model.get_submodule(name) for name in trainable] + [model.get_classifier()]
    keep_ids = {id(p) for module in keep for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)


class Vanilla:
    """Dense fine-tuning of everything, or of the last `last_n` target layers (+ head)."""

    def __init__(self, name: str = "vanilla", targets: str = "mlp", last_n: int | None = None):
        self.name, self.targets, self.last_n = name, targets, last_n

    def apply(self, model: nn.Module, calibration: Batch) -> dict:
        if self.last_n is not None:
            freeze_except(model, wasi.find_targets(model, self.targets, self.last_n))
        return {}

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        return optimizer([p for p in model.parameters() if p.requires_grad])


class Subspace(Vanilla):
    """ASI, WSI and WASI (wasi-method.md sections 2-5), one class configured by `weight`/`activation`.

    Activation ranks come from exactly one of `ranks`, `epsilon_act` or `budget_mib` (the DP of
    section 5, whose table is cached as JSON at `rank_table` so a sweep computes it once).
    """

    def __init__(
        self,
        name: str,
        weight: bool,
        activation: bool,
        epsilon: float = 0.8,
        epsilon_act: float | None = None,
        ranks: list[int] | None = None,
        budget_mib: float | None = None,
        eps_set: list[float] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        targets: str = "mlp",
        last_n: int | None = None,
        weight_update: str = "factored",
        rank_table: str | None = None,
        seed: int = 0,
    ):
        super().__init__(name, targets, last_n)
        self.config = wasi.WASIConfig(
            weight=weight,
            activation=activation,
            epsilon=epsilon,
            epsilon_act=epsilon_act,
            ranks=list(ranks) if ranks is not None else None,
            budget_bytes=int(budget_mib * 2**20) if budget_mib is not None else None,
            eps_set=tuple(eps_set),
            targets=targets,
            last_n=last_n,
            weight_update=weight_update,
            seed=seed,
        )
        self.rank_table_path = Path(rank_table) if rank_table else None

    def apply(self, model: nn.Module, calibration: Batch) -> dict:
        table = self._cached_rank_table()
        summary = wasi.inject(model, self.config, calibration=calibration, rank_table=table)
        if summary.rank_table is not None and table is None and self.rank_table_path is not None:
            self.rank_table_path.parent.mkdir(parents=True, exist_ok=True)
            self.rank_table_path.write_text(summary.rank_table.to_json())
            log.info("rank table saved to %s", self.rank_table_path)
        return summary.to_dict()

    def _cached_rank_table(self) -> wasi.RankTable | None:
        if self.config.budget_bytes is None or self.rank_table_path is None:
            return None
        if not self.rank_table_path.is_file():
            return None
        log.info("reusing rank table %s", self.rank_table_path)
        return wasi.RankTable.from_json(self.rank_table_path.read_text())

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        if not self.config.weight:
            return super().build_optimizer(model, optimizer)
        if optimizer.func is not torch.optim.SGD:
            raise ValueError(
                f"method={self.name} updates its weight factors with the subspace SGD step of "
                f"wasi-method.md section 2, so it needs optimizer=sgd (got {optimizer.func.__name__})."
            )
        return wasi.SubspaceSGD(model, **optimizer.keywords)
