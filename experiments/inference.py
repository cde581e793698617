"""Predictions of an exported model for image files, or for texts (a text model's export).

    python -m experiments.inference EXPORT_DIR IMAGE [IMAGE ...] [--top-k K] [--batch N] [--device cpu]
    python -m experiments.inference EXPORT_DIR TEXT [TEXT ...] ...      # e.g. "the owl is red . [SEP] is there a bird"

EXPORT_DIR is what `python -m experiments.export RUN_DIR` writes (RUN_DIR/export: model.json and
model.safetensors), loaded by experiments.deployment.exported.load_exported with torch, timm, safetensors and
wasi only. Each image is read with Pillow as RGB, resized to the model's input size and normalised with the
export's mean and std, as the run's evaluation did (experiments.data.datasets.image_transform). One
tab-separated line per image on stdout, after a header:

    image   class   score                  (score: the softmax probability of the predicted class index)
    image   class_1 score_1 ... class_K score_K     with --top-k K, best first

A text export (model.json `inputs: text`) reads each TEXT as the whole model input: the fields of the run's
dataset joined as its `template` (recorded in model.json, e.g. "{question} [SEP] {passage}"), tokenized by the
export's tokenizer and padded or cut to its max_length, as in training; its lines start with `text`.

A folder that is not an export, an image that cannot be read or a --top-k beyond the classes ends with one
line on stderr and exit status 2, before any prediction (exit statuses: experiments.training.errors).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import transforms as T

from experiments.builders.inputs import logits
from experiments.deployment.exported import ExportFormatError, ExportSpec, load_exported, load_spec, load_tokenizer

log = logging.getLogger(__name__)


class InferenceInputError(ValueError):
    """An argument of the command line is wrong (a folder, an image file, --top-k): exit status 2."""


def read_image(path: Path) -> Image.Image:
    """The image file as RGB; InferenceInputError naming the file when Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else f"{type(err).__name__}: {err}"
        raise InferenceInputError(f"{path} cannot be read as an image ({reason}). Fix: pass image files Pillow "
                                  "reads (JPEG, PNG, BMP, WebP, ...)") from None


def check_images(paths: Sequence[Path]) -> None:
    """InferenceInputError for the first path that is not a readable image (checked before any prediction)."""
    for path in paths:
        if not path.is_file():
            raise InferenceInputError(f"{path} cannot be read as an image (no such file). Fix: pass image files")
        try:
            with Image.open(path) as image:
                image.verify()  # the header and, where the format allows, the data, without decoding
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InferenceInputError(f"{path} cannot be read as an image ({type(err).__name__}: {err}). Fix: pass "
                                      "image files Pillow reads (JPEG, PNG, BMP, WebP, ...)") from None


def preprocess(image: Image.Image, spec: ExportSpec) -> Tensor:
    """PIL RGB image -> (3, S, S) in [0, 1], S = spec.image_size (resized, not cropped, as in training)."""
    size = spec.image_size
    return T.Compose([T.Resize((size, size), antialias=True), T.ToTensor()])(image)


@torch.no_grad()
def predict(model: nn.Module, paths: Sequence[Path], top_k: int = 1, batch: int = 32,
            device: str | torch.device = "cpu") -> Iterator[tuple[Path, list[int], list[float]]]:
    """(path, the top_k class indices, their softmax probabilities), best first, for every image of `paths`,
    `batch` images per forward. `model`: load_exported's (it carries `export_spec`)."""
    spec: ExportSpec = getattr(model, "export_spec")  # noqa: B009  (set by load_exported, unknown to nn.Module)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        x = torch.stack([preprocess(read_image(p), spec) for p in chunk]).to(device)
        probs = model(spec.normalize(x)).float().softmax(-1)
        scores, classes = probs.topk(top_k, dim=-1)
        yield from zip(chunk, classes.tolist(), scores.tolist())


@torch.no_grad()
def predict_texts(model: nn.Module, texts: Sequence[str], top_k: int = 1, batch: int = 32,
                  device: str | torch.device = "cpu") -> Iterator[tuple[str, list[int], list[float]]]:
    """(text, the top_k class indices, their softmax probabilities), best first, for every text, tokenized by the
    export's tokenizer at its max_length. `model`: load_exported's of a text export."""
    spec: ExportSpec = getattr(model, "export_spec")  # noqa: B009
    tokenizer = getattr(model, "tokenizer")  # noqa: B009  (set by main)
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=spec.max_length,
                            return_tensors="pt")
        x = {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
        scores, classes = logits(model, x).float().softmax(-1).topk(top_k, dim=-1)
        yield from zip(chunk, classes.tolist(), scores.tolist())


def header(top_k: int, item: str = "image") -> str:
    if top_k == 1:
        return f"{item}\tclass\tscore"
    return "\t".join([item, *(f"{name}_{i}" for i in range(1, top_k + 1) for name in ("class", "score"))])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by python -m experiments.export")
    parser.add_argument("images", nargs="+", help="image files (anything Pillow reads), or texts for a text model")
    parser.add_argument("--top-k", type=int, default=1, help="classes per image, best first")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.batch < 1:
            raise InferenceInputError(f"--batch {args.batch}: must be at least 1. Fix: --batch 32")
        if not args.export_dir.is_dir():
            raise InferenceInputError(f"{args.export_dir} does not exist. Fix: pass an export folder (python -m "
                                      "experiments.export RUN_DIR writes RUN_DIR/export)")
        try:
            text = load_spec(args.export_dir).inputs == "text"
            if not text:
                args.images = [Path(p) for p in args.images]
                check_images(args.images)
            model = load_exported(args.export_dir, args.device)
            if text:
                model.tokenizer = load_tokenizer(args.export_dir)
        except (FileNotFoundError, ExportFormatError) as err:
            raise InferenceInputError(str(err)) from None
        classes = getattr(model, "export_spec").num_classes  # noqa: B009
        if not 1 <= args.top_k <= classes:
            raise InferenceInputError(f"--top-k {args.top_k}: the model has {classes} classes. Fix: --top-k 1 to "
                                      f"{classes}")
        print(header(args.top_k, "text" if text else "image"))
        predictions = (predict_texts if text else predict)(model, args.images, args.top_k, args.batch, args.device)
        for item, top, scores in predictions:
            print("\t".join([str(item), *(f"{c}\t{s:.4f}" for c, s in zip(top, scores))]), flush=True)
    except InferenceInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
