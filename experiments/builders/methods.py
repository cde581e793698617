"""Fine-tuning methods as config-instantiated objects: `conf/method/<name>.yaml` names a class here.

A method does four things to a freshly built model: `apply` (convert layers, freeze parameters,
return a JSON-able summary; it may read calibration batches from the training loader),
`build_optimizer`, `clip_grad_norm_` (the training step's gradient clipping), and `inference_model`
(what is deployed, e.g. LoRA merged). Adding a method is three pieces:
  - a class here (usually extending Vanilla), whose constructor takes the YAML's keys and whose NAME is the
    method's name (`identity`: what the class trains, which the config's `method.name` must say);
  - its schema in experiments/configuration/schema.py (a dataclass extending VanillaMethod: the type and
    allowed values of each new key), listed in SCHEMAS as "<name>_method_schema";
  - conf/method/<name>.yaml, starting from that schema (`defaults: [/<name>_method_schema@_here_, _self_]`)
    and holding the values, with `_target_` naming the class.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_args

import torch
from torch import nn

import wasi
from experiments.builders.factors import factor_linear
from experiments.builders.inputs import Inputs, concat, logits, move, size, take
from experiments.configuration.choices import Finetune, Recompute
from experiments.configuration.schema import invalid
from experiments.data.loaders import Batch, first_batch
from experiments.measurement.units import MIB, bytes_to_mib_ceil, mib_to_bytes
from wasi import svd_llm
from wasi.optim import Basis

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)


class Vanilla:
    """Dense fine-tuning of the targets (the last `last_n` of them, or all), the head, and with `train_rest`
    (vanilla's default) everything else; `wasi.set_trainable` decides, the same rule for every method.

    recompute: "none", "attn" (`wasi.checkpoint_attention`: every block's attention saves only its input and
    recomputes q, k, v and the attention in backward) or "block" (`wasi.checkpoint_blocks`: every block saves only
    its input). "mlp" needs the low-rank layers of WSI/WASI.
    """

    NAME: ClassVar[str] = "vanilla"
    clip_grad_norm_ = staticmethod(wasi.clip_grad_norm_)  # (model, max_norm): factored gradients included
    recomputes: tuple[str, ...] = get_args(Recompute)  # the method.recompute modes this method has

    @classmethod
    def identity(cls, options: Any) -> tuple[str, str]:
        """What this class trains when configured with `options` (the `method` node), and the settings that
        decide it ("" when the class alone does). experiments.configuration.schema refuses a `method.name` that
        says otherwise, so results are never labelled with another method's name."""
        return cls.NAME, ""

    def __init__(self, name: str = "vanilla", targets: str = "mlp", last_n: int | None = None,
                 train_rest: bool = True, recompute: Recompute = "none"):
        if recompute not in get_args(Recompute):
            raise ValueError(f"method.recompute={recompute} is not available for method={name}: choose one of "
                             f"{list(get_args(Recompute))} (recompute=mlp needs the low-rank layers of wsi or wasi)")
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


class Pretrain(Vanilla):
    """Dense training of every parameter from scratch (`experiment=pretrain`), with the pretraining recipe's
    two differences from vanilla: no weight decay on vectors (biases, norms) and the position embedding
    (`decay_groups`), and gradients clipped by torch.nn.utils.clip_grad_norm_: for a model without factored
    layers the same norm as wasi.clip_grad_norm_'s, summed in another order, and the shipped checkpoint was
    trained with it, so it stays reproducible bit for bit."""

    NAME: ClassVar[str] = "pretrain"

    @staticmethod
    def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def __init__(self, name: str = "pretrain"):
        super().__init__(name)

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        return optimizer(decay_groups(model, optimizer.keywords.get("weight_decay", 0.0)))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: weight decay on the matrices, none on vectors and the position embedding."""
    decays = {n: p.ndim >= 2 and "pos_embed" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    other = [p for n, p in model.named_parameters() if not decays[n]]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


class Subspace(Vanilla):
    """ASI, WSI and WASI (docs/method.md), one class configured by `weight`/`activation`: `wasi.inject`
    with the `wasi.WASIConfig` of `options` (its fields, defaults and checks are the library's).

    Activation ranks come from at most one of `ranks`, `epsilon_act` or `budget_mib` (docs/method.md, Rank
    selection under a budget; the table is cached as JSON at `rank_table` so a sweep computes it once); with
    none of them, from `epsilon_act` = `epsilon`. `budget_mib` is the config's unit for the library's
    `budget_bytes` (callers that have bytes pass `budget_bytes` instead). `basis` is the optimizer's
    (wasi.SubspaceSGD): the orthonormal basis of the new weight subspace its factored step takes.
    """

    NAMES: ClassVar[dict[tuple[bool, bool], str]] = {(True, True): "wasi", (True, False): "wsi", (False, True): "asi"}

    @classmethod
    def identity(cls, options: Any) -> tuple[str, str]:
        """wasi, wsi or asi by (weight, activation)."""
        weight, activation = bool(options.weight), bool(options.activation)
        return (cls.NAMES.get((weight, activation), "nothing"),
                f" with method.weight={str(weight).lower()} and method.activation={str(activation).lower()}")

    def __init__(self, name: str, budget_mib: float | None = None, rank_table: str | None = None,
                 basis: Basis = "qr", **options: Any):
        if budget_mib is not None:
            options["budget_bytes"] = mib_to_bytes(budget_mib)
        self.config = wasi.WASIConfig(**options)
        self.name, self.targets, self.last_n = name, self.config.targets, self.config.last_n
        self.train_rest, self.recompute = self.config.train_rest, self.config.recompute_mode
        self.recomputes = tuple(m for m in wasi.config.RECOMPUTE if self.config.weight or m != "mlp")  # mlp: L, R
        self.rank_table_path = Path(rank_table) if rank_table else None
        self.basis = basis
        budget = self.config.budget_bytes
        self.budget_mib = budget_mib if budget_mib is not None or budget is None else budget / MIB  # for messages

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
        return wasi.SubspaceSGD(model, basis=self.basis, **optimizer.keywords)


class Lora(Vanilla):
    """Hugging Face PEFT LoRA on the target linears (frozen dense W + rank-r adapters); the head, and with
    `train_rest` everything else, trains densely (`wasi.set_trainable`)."""

    NAME: ClassVar[str] = "lora"

    def __init__(self, name: str = "lora", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 targets: str = "mlp", last_n: int | None = None, train_rest: bool = False,
                 recompute: Recompute = "none"):
        super().__init__(name, targets, last_n, train_rest, recompute)
        self.r, self.alpha, self.dropout = r, alpha, dropout

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        names = wasi.find_targets(model, self.targets)
        tuned = wasi.tuned_targets(model, names, self.last_n)
        self.add_adapters(model, tuned)
        wasi.set_trainable(model, names, self.train_rest, self.last_n)
        self.checkpoint(model)
        return {"lora/r": self.r, "lora/alpha": self.alpha, "lora/targets": tuned}

    def add_adapters(self, model: nn.Module, names: list[str]) -> None:
        """PEFT LoRA on the named linears, in place (PEFT freezes everything but the adapters)."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.lora_config(names), model)

    def lora_config(self, names: list[str]) -> LoraConfig:
        """The PEFT config of the adapters on the named linears (a LoRA variant sets its own options here)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names)

    def inference_model(self, model: nn.Module) -> nn.Module:
        """A copy with every adapter merged into its dense weight (what one deploys)."""
        from peft.tuners.lora import LoraLayer

        merged = copy.deepcopy(model)
        for module in merged.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        return merged


class SvdLlm(Vanilla):
    """SVD-LLM truncation-aware whitening init (docs/method.md, Variants and which layers train), then fine-tuning.

    Each target W becomes W_u W_v at rank k from the parameter ratio `ratio` or, if `ratio` is
    null, from WASI's weight `epsilon` (equal size to WSI/WASI). `finetune`: "lora" (PEFT LoRA on
    both factors, the paper's baseline) or "factors" (plain training of W_u, W_v). The whitening
    matrices C are cached at `cache` (safetensors) with a fingerprint of the weights and images they come from.
    """

    NAME: ClassVar[str] = "svd_llm"

    def __init__(self, name: str = "svd_llm", ratio: float | None = None, epsilon: float = 0.8,
                 calib_samples: int = 256, finetune: Finetune = "lora", r: int = 8, alpha: float = 16,
                 targets: str = "mlp", last_n: int | None = None, train_rest: bool = False,
                 recompute: Recompute = "none", cache: str | None = None):
        super().__init__(name, targets, last_n, train_rest, recompute)
        if finetune not in get_args(Finetune):
            raise ValueError(f"method.finetune={finetune}: must be one of {', '.join(get_args(Finetune))}")
        self.ratio, self.epsilon, self.calib_samples, self.finetune = ratio, epsilon, calib_samples, finetune
        self.lora = Lora(r=r, alpha=alpha)
        self.cache = Path(cache) if cache else None

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        targets = wasi.find_targets(model, self.targets)
        names = wasi.tuned_targets(model, targets, self.last_n)
        whitening = self._whitening(model, names, loader, device)
        ranks = {}
        for name in names:
            linear = model.get_submodule(name)
            w = linear.weight.detach()
            o, i = w.shape
            k = (svd_llm.rank_from_ratio(o, i, self.ratio) if self.ratio is not None
                 else svd_llm.rank_from_epsilon(w, self.epsilon))
            w_u, w_v = svd_llm.svd_llm_factors(w, whitening[name], k)
            wasi.replace_module(model, name, factor_linear(linear, w_u, w_v))
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

        images, seen = [], 0  # images, or token ids and masks
        for x, _ in loader:
            images.append(take(x, self.calib_samples - seen))
            seen += size(images[-1])
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
                logits(model, move(x, device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        whitening = {n: svd_llm.whitening(g.gram / g.count).contiguous() for n, g in grams.items()}  # the mean xᵀx
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(whitening, str(self.cache), metadata={"fingerprint": key})
        return whitening


def _fingerprint(model: nn.Module, images: list[Inputs]) -> str:
    """sha256 over every parameter and buffer of `model` and the calibration inputs, byte for byte."""
    digest = hashlib.sha256()
    joined = concat(images)
    inputs = ([("images", joined)] if isinstance(joined, torch.Tensor)
              else [(f"inputs.{k}", v) for k, v in joined.items()])
    for name, tensor in [*model.state_dict().items(), *inputs]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Today's memory-saving peers, each through its own library.
# ---------------------------------------------------------------------------------------------

def adamw_settings(name: str, optimizer: functools.partial, builds: str) -> dict:
    """The keywords of the `optimizer=adamw` partial that method `name` builds its own AdamW-type optimizer
    (`builds`) from; another optimizer is a ValueError naming the fix."""
    if optimizer.func is not torch.optim.AdamW:
        raise ValueError(f"method={name} trains with {builds}, built from the AdamW settings, so it needs "
                         f"optimizer=adamw (got {optimizer.func.__name__})")
    return dict(optimizer.keywords)


class Velora(Lora):
    """VeLoRA (Miles et al., NeurIPS 2024) as PEFT's LoRA variant (`LoraConfig(velora_config=VeloraConfig(...))`):
    LoRA adapters on the target linears whose A projection saves each token's input x: (T, I) only as its
    `num_groups` sub-token projections (T, num_groups) onto one vector (the first batch's normalised mean
    sub-token with init_type="batch_average_once"), and rebuilds x from them (times `scale`) for A's gradient in
    backward. B's gradient and the input gradient stay exact; merging is plain LoRA's."""

    NAME: ClassVar[str] = "velora"

    def __init__(self, name: str = "velora", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 targets: str = "mlp", last_n: int | None = None, train_rest: bool = False, recompute: str = "none",
                 num_groups: int = 32, scale: float = 0.1, init_type: str = "batch_average_once"):
        super().__init__(name, r, alpha, dropout, targets, last_n, train_rest, recompute)
        self.num_groups, self.scale, self.init_type = num_groups, scale, init_type

    def lora_config(self, names: list[str]) -> LoraConfig:
        from peft import VeloraConfig

        config = super().lora_config(names)
        config.velora_config = VeloraConfig(num_groups=self.num_groups, scale=self.scale, init_type=self.init_type)
        return config

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        return {**super().apply(model, loader, device), "velora/num_groups": self.num_groups,
                "velora/scale": self.scale, "velora/init_type": self.init_type}


class LoraFa(Lora):
    """LoRA-FA (Zhang et al. 2023) through PEFT: LoRA adapters whose A stays frozen at its random init while B
    trains with PEFT's LoRA-FA optimizer (`peft.optimizers.create_lorafa_optimizer`: AdamW, B's gradient
    projected by (A Aᵀ)⁻¹ scaled by (r/alpha)², so that ΔW = B A follows the full gradient's projection onto
    A's row space). With A frozen, an adapter keeps only A x (r per token) for backward, not its input x.
    Needs optimizer=adamw (its lr and weight_decay)."""

    NAME: ClassVar[str] = "lora_fa"

    def add_adapters(self, model: nn.Module, names: list[str]) -> None:
        """PEFT LoRA on the named linears, in place, keeping PEFT's tuner: the LoRA-FA optimizer reads the
        adapters' scaling from it (`inject_adapter_in_model` builds the same tuner and drops it)."""
        from peft import LoraModel

        self.tuner = LoraModel(model, self.lora_config(names), "default")

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        from peft.optimizers import create_lorafa_optimizer

        settings = adamw_settings(self.name, optimizer, "PEFT's LoRA-FA optimizer")
        return create_lorafa_optimizer(self.tuner, r=self.r, lora_alpha=self.alpha, lr=settings["lr"],
                                       weight_decay=settings.get("weight_decay", 0.0))  # freezes every lora_A


class Galore(Vanilla):
    """GaLore (Zhao et al., ICML 2024) through `galore-torch`: full fine-tuning (with `train_rest`, every
    parameter trains densely, as vanilla) with `galore_torch.GaLoreAdamW`, which keeps the Adam moments of each
    target weight W: (O, I) in a rank-`rank` projection of its gradient (P: the top singular vectors of the
    gradient of the smaller side, refreshed every `update_proj_gap` steps; the update is projected back and
    scaled by `scale`). The weights, their gradients and the activations stay dense; the model exports as
    vanilla's. galore-torch keeps each projection as a slice of its SVD factor, so a min(O, I)² matrix per
    weight stays allocated (metrics.weight_bytes counts it). Needs optimizer=adamw (its lr and weight_decay)."""

    NAME: ClassVar[str] = "galore"

    def __init__(self, name: str = "galore", targets: str = "mlp+attn", last_n: int | None = None,
                 train_rest: bool = True, recompute: str = "none", rank: int = 4, update_proj_gap: int = 500,
                 scale: float = 4.0, proj_type: str = "std"):
        super().__init__(name, targets, last_n, train_rest, recompute)
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type

    def apply(self, model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict:
        super().apply(model, loader, device)
        return {"galore/rank": self.rank, "galore/update_proj_gap": self.update_proj_gap,
                "galore/scale": self.scale, "galore/targets": self.projected_names(model)}

    def projected_names(self, model: nn.Module) -> list[str]:
        """The target linears (of the last `last_n` blocks) whose weights get GaLore's projected optimizer state."""
        return wasi.tuned_targets(model, wasi.find_targets(model, self.targets), self.last_n)

    def build_optimizer(self, model: nn.Module, optimizer: functools.partial) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW
        from galore_torch.galore_projector import GaLoreProjector

        settings = adamw_settings(self.name, optimizer, "galore_torch.GaLoreAdamW")
        # The optimizer state holds one GaLoreProjector per weight: let resume's weights_only load rebuild them.
        torch.serialization.add_safe_globals([GaLoreProjector])
        projected = [model.get_submodule(n).weight for n in self.projected_names(model)]
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}, {"params": projected, "rank": self.rank, "update_proj_gap": self.update_proj_gap,
                                     "scale": self.scale, "proj_type": self.proj_type}]
        return GaLoreAdamW(groups, no_deprecation_warning=True, **settings)
