"""Export a trained run as a standalone inference artefact, loaded by `experiments.deployment.exported`.

    python -m experiments.export RUN_DIR [--out DIR]        # DIR defaults to RUN_DIR/export
    python -m experiments.inference DIR IMAGE...            # predictions of the exported model (or DIR TEXT...)

Reads the run's `.hydra/config.yaml` and `best.safetensors` and writes `model.safetensors` and
`model.json` (see experiments/deployment/exported.py), and for a text model its tokenizer's files. A Hugging Face
model's architecture is recorded as its transformers class and config dict, taken from the model config (its
`config` settings, else the hub's config.json in the cache), so loading needs no download. The module structure is
rebuilt from the tensor names of the checkpoint, so no calibration data is needed:
- WSI/WASI layers (`L`, `R`, `bias`, and the dense `weight` of the reference/svd updates, dropped)
  become a low-rank wasi.WSILinear(L, R, bias);
- SVD-LLM factor pairs `Sequential(W_v, W_u)` become one (L=W_u, R=W_v, bias);
- PEFT LoRA adapters (on dense or factor linears) are merged into their weights;
- everything else (ASI, vanilla, frozen layers, head) stays dense.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from experiments.builders.factors import factor_linear
from experiments.builders.hub import load_tokenizer
from experiments.builders.inputs import Inputs, logits
from experiments.builders.methods import Lora
from experiments.builders.models import build_model as build_any_model
from experiments.deployment.exported import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ExportFormatError,
    ExportSpec,
    LayerSpec,
    build_model,
    load_exported,
    low_rank_linear,
)
from experiments.deployment.exported import load_tokenizer as load_tokenizer_of
from experiments.training.storage import DiskFullError, atomic
from wasi import WSILinear, replace_module

__all__ = ["export_run", "deployable", "RunExportError"]

log = logging.getLogger(__name__)


#: State a trained model holds for training only, which inference and LoRA merging never read: PEFT VeLoRA's
#: projection vectors (its backward compresses the adapter input with them).
TRAINING_ONLY = (".lora_velora_embed.",)


class RunExportError(RuntimeError):
    """A run folder cannot be exported (missing files, or weights that do not fit its config)."""


class NotARunError(RunExportError):
    """The folder given is not a run folder of train.py, or a run without weights to export: a wrong argument."""


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `model.safetensors` and `model.json` of the run's best weights to `out` (default RUN_DIR/export)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "export"
    cfg = read_run_config(run_dir)
    weights = run_dir / "best.safetensors"
    if not weights.is_file():
        raise NotARunError(f"{weights} not found: the run never finished an evaluation, so it has no weights to "
                           "export. Fix: export a run that completed at least one epoch (trainer.eval_interval), or "
                           f"continue this one: python train.py <its overrides> hydra.run.dir={run_dir} resume=true")
    spec, tokenizer = export_spec(cfg)
    model = deployable(build_model(spec), read_weights(weights), cfg.method, str(weights))
    spec.layers = [LayerSpec(name=n, in_features=m.in_features, out_features=m.out_features, rank=m.rank,
                             bias=m.bias is not None, source=spec.method)
                   for n, m in model.named_modules() if isinstance(m, WSILinear)]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fix = "free space there, or export elsewhere with --out DIR"
    with atomic(out / WEIGHTS_FILE, fix) as tmp:  # the usual file mode (safetensors writes 0600), full disk said
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    with atomic(out / CONFIG_FILE, fix) as tmp:
        tmp.write_text(spec.to_json())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _check_roundtrip(model, out, spec)
    log.info("exported %s (%s, %d low-rank layers, %d parameters) to %s", run_dir, spec.method, len(spec.layers),
             sum(t.numel() for t in tensors.values()), out)
    return out


def export_spec(cfg: DictConfig) -> tuple[ExportSpec, Any]:
    """The ExportSpec of a run's config (no layers yet) and, for a text model, its tokenizer. A timm model is its
    name and kwargs; a Hugging Face model (a config with a `builder`) its transformers class and config dict, read
    from the architecture built at random init from the run's model config."""
    classes, method = int(cfg.dataset.num_classes), str(cfg.method.name)
    if not cfg.model.get("builder"):
        kwargs = OmegaConf.to_container(cfg.model.get("kwargs") or {}, resolve=True)
        return ExportSpec(timm_name=cfg.model.timm_name, timm_kwargs=kwargs, num_classes=classes,  # type: ignore[arg-type]
                          image_size=int(cfg.model.image_size), mean=[float(m) for m in cfg.dataset.mean],
                          std=[float(s) for s in cfg.dataset.std], method=method), None
    random_init = cfg.model.copy()  # the run's architecture at random init: a pretrained run's is its checkpoint's
    with open_dict(random_init):
        random_init.config = {} if cfg.model.pretrained and not cfg.model.get("checkpoint") else cfg.model.config
        random_init.pretrained, random_init.checkpoint = False, None
    fresh = build_any_model(random_init, classes)
    text = cfg.model.inputs == "text"
    spec = ExportSpec(timm_name=None, timm_kwargs={}, num_classes=classes, method=method, inputs=str(cfg.model.inputs),
                      image_size=None if text else int(cfg.model.image_size),
                      mean=[] if text else [float(m) for m in cfg.dataset.mean],
                      std=[] if text else [float(s) for s in cfg.dataset.std],
                      transformers_class=type(fresh).__name__, transformers_config=fresh.config.to_dict(),
                      max_length=int(cfg.model.max_length) if text else None,
                      template=str(cfg.dataset.template) if text else None)
    return spec, load_tokenizer(cfg.model) if text else None


def read_run_config(run_dir: Path) -> DictConfig:
    """The run's composed config (`.hydra/config.yaml`, as Hydra saved it)."""
    file = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} does not exist. Fix: pass a run folder of train.py (it holds .hydra/, "
                           "best.safetensors and results.json)")
    if not file.is_file():
        raise NotARunError(f"{file} not found: {run_dir} is not a run folder of train.py. "
                           "Fix: pass the folder holding .hydra/, best.safetensors and results.json.")
    try:
        return OmegaConf.load(file)
    except Exception as err:  # YAML syntax, an unreadable file
        raise RunExportError(f"{file} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}): "
                             "the run folder is damaged. Fix: export another run") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """The run's best-validation weights (best.safetensors); RunExportError if the file is damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RunExportError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}): the run's best weights are damaged. Fix: train "
                             "the run again, or export another run") from None


def deployable(model: nn.Module, state: dict[str, Tensor], method_cfg: DictConfig,
               source: str = "checkpoint") -> nn.Module:
    """Reshape a fresh `model` (timm or transformers) to fit the trained `state`, load it strictly, and return the
    inference form: LoRA merged (LoRA-FA's and VeLoRA's too; VeLoRA's TRAINING_ONLY projections dropped),
    WSI/WASI and SVD-LLM factors as low-rank wasi.WSILinear, the rest dense (vanilla, GaLore)."""
    state = {k: v for k, v in state.items() if not any(part in k for part in TRAINING_ONLY)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    svd_pairs = [n for n in linears if _weight(state, f"{n}.0") is not None]  # SVD-LLM Sequential(W_v, W_u)
    for name in svd_pairs:
        w_u, w_v = _weight(state, f"{name}.1"), _weight(state, f"{name}.0")
        replace_module(model, name, factor_linear(model.get_submodule(name), w_u, w_v))
    for name in sorted({k[:-2] for k in state if k.endswith(".L") and f"{k[:-2]}.R" in state}):
        (o, k), i = state[f"{name}.L"].shape, state[f"{name}.R"].shape[1]
        state.pop(f"{name}.weight", None)  # dense shadow W of the reference/svd weight updates; inference uses L R
        replace_module(model, name, low_rank_linear(i, o, k, f"{name}.bias" in state))
    adapters = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if adapters:
        r = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
        Lora(r=r, alpha=float(method_cfg.alpha)).add_adapters(model, adapters)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RunExportError(f"{source} does not fit the model rebuilt from the run's config: {err}") from err
    if adapters:
        _merge_lora(model)
    for name in svd_pairs:
        down, up = model.get_submodule(name)
        low_rank = low_rank_linear(down.in_features, up.out_features, down.out_features, up.bias is not None)
        bias = {} if up.bias is None else {"bias": up.bias}
        low_rank.load_state_dict({"L": up.weight, "R": down.weight, **bias})
        replace_module(model, name, low_rank)
    return model.eval()


def _weight(state: dict[str, Tensor], prefix: str) -> Tensor | None:
    """The weight of linear `prefix`, plain or wrapped by a PEFT LoRA layer."""
    return state.get(f"{prefix}.weight", state.get(f"{prefix}.base_layer.weight"))


def _merge_lora(model: nn.Module) -> None:
    """Merge every PEFT LoRA layer into its base layer and put the base layer in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        module.merge()
        replace_module(model, name, module.get_base_layer())


@torch.no_grad()
def _check_roundtrip(model: nn.Module, out: Path, spec: ExportSpec) -> None:
    """Reload the artefact and compare its logits with the exported module's on a random batch (images, or token ids
    of the tokenizer's vocabulary with the last two of one sequence padded)."""
    g = torch.Generator().manual_seed(0)
    if spec.inputs == "text":
        vocab, length = len(load_tokenizer_of(out)), int(spec.max_length or 1)
        ids = torch.randint(0, vocab, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        x: Inputs = {"input_ids": ids, "attention_mask": mask}
    else:
        size = int(spec.image_size or 1)
        x = torch.randn(2, 3, size, size, generator=g)
    expected, got = logits(model.eval(), x), logits(load_exported(out), x)
    if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
        raise RunExportError(f"reloaded {out} differs from the exported model by {(expected - got).abs().max():.3g}")


def main(argv: list[str] | None = None) -> None:
    """The command line; a failure ends with one line on stderr: exit status 2 for a folder that is not a run
    with weights, 1 for a run that cannot be exported (damaged or foreign weights, a full disk)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run folder of train.py (holds .hydra/ and best.safetensors)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_run(args.run_dir, args.out)
    except NotARunError as err:
        stop(str(err), 2)
    except (RunExportError, ExportFormatError, DiskFullError) as err:
        stop(str(err), 1)


def stop(line: str, status: int) -> None:
    """One line on stderr, then exit with `status`."""
    print(f"error: {' '.join(line.split())}", file=sys.stderr)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
