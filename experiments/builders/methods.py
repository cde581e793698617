"""Fine-tuning methods as config-instantiated objects: `conf/method/<name>.yaml` names a class here.

A method does three things to a freshly built model: `apply` (convert layers, freeze parameters,
return a JSON-able summary; it may read calibration batches from the training loader),
`build_optimizer`, and `inference_model` (what is deployed, e.g. LoRA merged). Adding a method
is a new class and a YAML file.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

import wasi
from experiments.configuration.schema import bytes_to_mib_ceil, invalid, mib_to_bytes
from wasi import svd_llm

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def first_batch(loader: Iterable[Batch], device: torch.device) -> Batch:
    x, y = next(iter(loader))
    return x.to(device), y.to(device)


class Vanilla:
    """Dense fine-tuning of the targets (the last `last_n` of them, or all), the head, and with `train_rest`
    (vanilla's default) everything else; `wasi.set_trainable` decides, the same rule for every method.

    recompute: "none", "attn" (`wasi.checkpoint_attention`: every block's attention saves only its input and
    recomputes q, k, v and the attention in backward) or "block" (`wasi.checkpoint_blocks`: every block saves only
    its input). "mlp" needs the low-rank layers of WSI/WASI.
    """

    recomputes: tuple[str, ...] = ("none", "attn", "block")

    def __init__(self, name: str = "vanilla", targets: str = "mlp", last_n: int | None = None,
                 train_rest: bool = True, recompute: str = "none"):
        if recompute not in self.recomputes:
            raise ValueError(f"method.recompute={recompute} is not available for method={name}: choose one of "
                             f"{list(self.recomputes)} (recompute=mlp needs the low-rank layers of wsi or wasi)")
        self.name, self.targets, self.last_n = name, targets, last_n
        self.train_rest, self.recompute = train_rest, recompute

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        wasi.set_trainable(model, wasi.find_targets(model, self.targets), self.train_rest, self.last_n)
        self.checkpoint(model)
        return {}

    def checkpoint(self, model: nn.Module) -> None:
        """recompute=attn: every block's attention saves only its input (wasi.checkpoint_attention); recompute=block:
        every transformer block saves only its input (wasi.checkpoint_blocks)."""
        if self.recompute == "attn":
            wasi.checkpoint_attention(model)
        if self.recompute == "block":
            wasi.checkpoint_blocks(model)

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        return optimizer([p for p in model.parameters() if p.requires_grad])

    def inference_model(self, model: nn.Module) -> nn.Module:
        return model


class Subspace(Vanilla):
    """ASI, WSI and WASI (docs/method.md), one class configured by `weight`/`activation`: `wasi.inject`
    with a `wasi.WASIConfig` of these options (train_rest defaults to false, recompute to mlp for WSI/WASI).

    Activation ranks come from at most one of `ranks`, `epsilon_act` or `budget_mib` (docs/method.md, Rank
    selection under a budget; the table is cached as JSON at `rank_table` so a sweep computes it once); with
    none of them, from `epsilon_act` = `epsilon`. `budget_bytes`: the budget in the library's unit, for
    callers that have it in bytes (configs set `budget_mib`).
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
        budget_bytes: int | None = None,
        eps_set: list[float] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        targets: str = "mlp",
        last_n: int | None = None,
        train_rest: bool = False,
        weight_update: str = "factored",
        recompute: str | None = None,
        rank_table: str | None = None,
        seed: int = 0,
    ):
        self.name, self.targets, self.last_n, self.train_rest = name, targets, last_n, train_rest
        budget_bytes = mib_to_bytes(budget_mib) if budget_mib is not None else budget_bytes
        self.config = wasi.WASIConfig(
            weight=weight,
            activation=activation,
            epsilon=epsilon,
            epsilon_act=epsilon_act,
            ranks=list(ranks) if ranks is not None else None,
            budget_bytes=budget_bytes,
            eps_set=tuple(eps_set),
            targets=targets,
            last_n=last_n,
            train_rest=train_rest,
            weight_update=weight_update,
            recompute=recompute,
            seed=seed,
        )
        self.recompute = self.config.recompute
        self.recomputes = tuple(m for m in wasi.config.RECOMPUTE if weight or m != "mlp")  # mlp needs L, R
        self.rank_table_path = Path(rank_table) if rank_table else None
        self.budget_mib = budget_bytes / 2**20 if budget_mib is None and budget_bytes else budget_mib  # for messages

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        table = self._cached_rank_table()
        try:
            summary = wasi.inject(model, self.config, calibration=first_batch(loader, device), rank_table=table)
        except wasi.InfeasibleBudgetError as err:  # the library speaks bytes; the config, MiB
            enough = bytes_to_mib_ceil(err.min_feasible_bytes)
            raise invalid("method.budget_mib", self.budget_mib, "below the smallest activation memory of these layers "
                          "at any epsilon of method.eps_set", f"method.budget_mib={enough} or more, smaller values in "
                          "method.eps_set, or fewer converted layers (method.targets, method.last_n)") from err
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
                f"method={self.name} updates its weight factors with the subspace SGD step (docs/method.md, "
                f"Factored update), so it needs optimizer=sgd (got {optimizer.func.__name__})."
            )
        return wasi.SubspaceSGD(model, **optimizer.keywords)


class Lora(Vanilla):
    """Hugging Face PEFT LoRA on the target linears (frozen dense W + rank-r adapters); the head, and with
    `train_rest` everything else, trains densely (`wasi.set_trainable`)."""

    def __init__(self, name: str = "lora", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 targets: str = "mlp", last_n: int | None = None, train_rest: bool = False, recompute: str = "none"):
        super().__init__(name, targets, last_n, train_rest, recompute)
        self.r, self.alpha, self.dropout = r, alpha, dropout

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        names = wasi.find_targets(model, self.targets)
        tuned = names if self.last_n is None else names[-self.last_n:]
        self.add_adapters(model, tuned)
        wasi.set_trainable(model, names, self.train_rest, self.last_n)
        self.checkpoint(model)
        return {"lora/r": self.r, "lora/alpha": self.alpha, "lora/targets": tuned}

    def add_adapters(self, model: nn.Module, names: list[str]) -> None:
        """PEFT LoRA on the named linears, in place (PEFT freezes everything but the adapters)."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names)
        inject_adapter_in_model(config, model)

    def inference_model(self, model: nn.Module) -> nn.Module:
        """A copy with every adapter merged into its dense weight (what one deploys)."""
        from peft.tuners.lora import LoraLayer

        merged = copy.deepcopy(model)
        for module in merged.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        return merged


def factor_linear(linear: nn.Linear, w_u: torch.Tensor, w_v: torch.Tensor) -> nn.Sequential:
    """nn.Linear(I, O) -> Sequential(Linear(I, k, no bias) = W_v, Linear(k, O) = W_u, bias)."""
    k = w_v.shape[0]
    down = nn.Linear(linear.in_features, k, bias=False)
    up = nn.Linear(k, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        down.weight.copy_(w_v)
        up.weight.copy_(w_u)
        if linear.bias is not None:
            up.bias.copy_(linear.bias)
    return nn.Sequential(down, up).to(linear.weight.device)


class SvdLlm(Vanilla):
    """SVD-LLM truncation-aware whitening init (docs/method.md, Variants and which layers train), then fine-tuning.

    Each target W becomes W_u W_v at rank k from the parameter ratio `ratio` or, if `ratio` is
    null, from WASI's weight `epsilon` (equal size to WSI/WASI). `finetune`: "lora" (PEFT LoRA on
    both factors, the paper's baseline) or "factors" (plain training of W_u, W_v). The whitening
    matrices C are cached at `cache` (safetensors) with a fingerprint of the weights and images they come from.
    """

    def __init__(self, name: str = "svd_llm", ratio: float | None = None, epsilon: float = 0.8,
                 calib_samples: int = 256, finetune: str = "lora", r: int = 8, alpha: float = 16,
                 targets: str = "mlp", last_n: int | None = None, train_rest: bool = False, recompute: str = "none",
                 cache: str | None = None):
        super().__init__(name, targets, last_n, train_rest, recompute)
        if finetune not in ("lora", "factors"):
            raise ValueError(f"method.finetune must be 'lora' or 'factors', got {finetune!r}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"method.ratio must be in (0, 1] or null (rank from method.epsilon), got {ratio}")
        self.ratio, self.epsilon, self.calib_samples, self.finetune = ratio, epsilon, calib_samples, finetune
        self.lora = Lora(r=r, alpha=alpha)
        self.cache = Path(cache) if cache else None

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        targets = wasi.find_targets(model, self.targets)
        names = targets if self.last_n is None else targets[-self.last_n:]
        whitening = self._whitening(model, names, loader, device)
        ranks = {}
        for name in names:
            linear = model.get_submodule(name)
            w = linear.weight.detach()
            o, i = w.shape
            k = (svd_llm.rank_from_ratio(o, i, self.ratio) if self.ratio is not None
                 else svd_llm.rank_from_epsilon(w, self.epsilon))
            w_u, w_v = svd_llm.svd_llm_factors(w, whitening[name], k)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, factor_linear(linear, w_u, w_v))
            ranks[name] = k
        if self.finetune == "lora":
            self.lora.add_adapters(model, [f"{name}.{j}" for name in names for j in (0, 1)])
        wasi.set_trainable(model, targets, self.train_rest, self.last_n)
        self.checkpoint(model)
        return {"svd_llm/rank": ranks, "svd_llm/finetune": self.finetune}

    def inference_model(self, model: nn.Module) -> nn.Module:
        return self.lora.inference_model(model) if self.finetune == "lora" else model

    @torch.no_grad()
    def _whitening(self, model: nn.Module, names: list[str], loader: Iterable[Batch],
                   device: torch.device) -> dict[str, torch.Tensor]:
        """C per target layer from Σ xᵀx over the first `calib_samples` training images. Cached on disk with
        a fingerprint of what it depends on (the model's weights and those images): a file made from other
        weights or images is recomputed, not reused."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        images, seen = [], 0
        for x, _ in loader:
            images.append(x[: self.calib_samples - seen])
            seen += images[-1].shape[0]
            if seen >= self.calib_samples:
                break
        key = _fingerprint(model, images)
        if self.cache is not None and self.cache.is_file():
            with safe_open(str(self.cache), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key and set(f.keys()) == set(names):
                    log.info("reusing SVD-LLM whitening from %s", self.cache)
                    return {n: f.get_tensor(n) for n in names}
        grams = {n: svd_llm.GramAccumulator(model.get_submodule(n).in_features, device) for n in names}
        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: grams[n].update(a[0]))
                 for n in names]
        was_training = model.training
        model.eval()
        try:
            for x in images:
                model(x.to(device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        whitening = {n: svd_llm.whitening(g.gram / g.count).contiguous() for n, g in grams.items()}  # the mean xᵀx
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(whitening, str(self.cache), metadata={"fingerprint": key})
        return whitening


def _fingerprint(model: nn.Module, images: list[torch.Tensor]) -> str:
    """sha256 over every parameter and buffer of `model` and the images, byte for byte."""
    digest = hashlib.sha256()
    for name, tensor in [*model.state_dict().items(), ("images", torch.cat(images))]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
