"""Faults and wrong inputs outside the training loop: a full disk, W&B without a network, the report, inference
and export command lines, Ctrl-C, settings that name nothing or the wrong thing, the run folder, packaging.
Each ends with one line that names what is wrong and the fix, the documented exit status, and the files that
were there before left intact."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from experiments import bench, inference, report
from experiments import export as export_tool
from experiments.builders import models
from experiments.configuration.schema import ConfigError
from experiments.data import datasets
from experiments.deployment.exported import load_exported
from experiments.measurement.results import write_results
from experiments.training import checkpoint, errors, run_folder, storage
from experiments.training.checkpoint import Progress
from experiments.training.hardware import setup_hardware, usable_cpus
from experiments.training.signals import StopRequest
from tests.helpers import ENV, ROOT, compose, train

SMALL = ["model.kwargs.depth=2", "dataset.source.train_size=160", "dataset.source.test_size=64", "trainer.epochs=1",
         "trainer.batch_size=16", "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.measure=false",
         "logger.mode=disabled"]
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def one_line(stderr: str) -> str:
    """The single line a failed command leaves on stderr (progress bars and log records aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def full_disk_at(path: Path) -> None:
    """Make the next atomic write of `path` hit a full disk: its temporary file is /dev/full, where every write
    fails with ENOSPC (so the writer raises what it raises on a real full disk)."""
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")


def tiny_training() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)


# ---------------------------------------------------------------------------------------------
# 8. A full disk
# ---------------------------------------------------------------------------------------------

@needs_dev_full
def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(tmp_path):
    model, optimizer, scheduler = tiny_training()
    last = tmp_path / "last.ckpt"
    checkpoint.save(last, model, optimizer, scheduler, Progress(step=1), [{}], {"seed": 1})
    before = last.read_bytes()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    full_disk_at(last)
    with pytest.raises(storage.DiskFullError) as info:  # torch's own "unexpected pos" failure, from /dev/full
        checkpoint.save(last, model, optimizer, scheduler, Progress(step=2), [{}], {"seed": 1})
    message = str(info.value)
    assert message.startswith(f"the disk holding {tmp_path.resolve()} is full (")
    assert f"{last} could not be written; the previous last.ckpt is intact" in message
    assert f"hydra.run.dir={tmp_path} resume=true" in message and "\n" not in message
    assert info.value.errno == 28 and "unexpected pos" in str(info.value.__cause__)
    assert last.read_bytes() == before and checkpoint.read(last)["progress"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_full_disk_for_the_best_weights_or_the_results_keeps_the_previous_files(tmp_path, monkeypatch):
    best, results = tmp_path / "best.safetensors", tmp_path / "results.json"
    checkpoint.save_weights(best, {"w": torch.ones(3)})
    write_results(results, {"test/acc": 0.5})
    (tmp_path / "last.ckpt").write_bytes(b"a finished training")

    def full(tensors, filename, metadata=None):  # what safetensors raises when the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(storage.DiskFullError, match=r"best.safetensors could not be written; the previous "
                       r"best.safetensors is intact\. Fix: free space there .* resume=true"):
        checkpoint.save_weights(best, {"w": torch.zeros(3)})
    assert load_file(str(best))["w"].tolist() == [1.0, 1.0, 1.0]
    if os.path.exists("/dev/full"):
        full_disk_at(results)  # Python's own OSError(ENOSPC)
        with pytest.raises(storage.DiskFullError, match="results.json could not be written; the previous"):
            write_results(results, {"test/acc": 0.9})
        assert json.loads(results.read_text()) == {"test/acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.ckpt", "results.json"]


@pytest.mark.slow
@needs_dev_full
def test_train_py_on_a_full_disk_ends_with_one_line_and_keeps_the_best_weights(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    full_disk_at(run_dir / "last.ckpt")  # the end-of-epoch checkpoint, after best.safetensors was written
    proc = train(*SMALL, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith(f"error: DiskFullError: the disk holding {run_dir.resolve()} is full (")
    assert f"{run_dir}/last.ckpt could not be written; there was no earlier last.ckpt. Fix: free space" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "best.safetensors", "metrics.jsonl", "train.log"]
    assert load_file(str(run_dir / "best.safetensors"))  # intact and readable


# ---------------------------------------------------------------------------------------------
# 9. W&B online without a network
# ---------------------------------------------------------------------------------------------

def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a subprocess run of its own; make test-slow
def test_online_wandb_without_a_network_logs_offline_in_seconds_and_a_ctrl_c_while_it_waits_stops_the_run(tmp_path):
    """Two runs at once (their waits overlap): one left alone falls back to an offline W&B run and finishes; the
    other gets Ctrl-C while W&B waits for the network, and stops there, without starting the offline run or
    training a step. What is left of the wait is W&B's own service ending its request (logger.init_timeout)."""
    env = {**ENV, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}", "WANDB_API_KEY": "a" * 40,
           "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_MODE", None)
    start = lambda run_dir: subprocess.Popen([sys.executable, "train.py", *SMALL, "logger.mode=online",
                                              f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    alone, stopped = tmp_path / "alone", tmp_path / "stopped"
    runs = {alone: start(alone), stopped: start(stopped)}
    try:
        started = time.monotonic()
        while not (stopped / "wandb").exists() and runs[stopped].poll() is None:  # wandb.init has begun
            time.sleep(0.01)
        time.sleep(0.5)  # into its wait for the network
        runs[stopped].send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out = {stopped: runs[stopped].communicate(timeout=120)}
        took = time.monotonic() - interrupted
        out[alone] = runs[alone].communicate(timeout=120)
    finally:
        for proc in runs.values():
            proc.kill()
    assert runs[alone].returncode == 0, out[alone][1][-3000:]
    assert time.monotonic() - started < 60  # W&B's default would wait 90 s before the fallback
    fallback = [line for line in out[alone][0].splitlines() if "W&B online did not start the run" in line]
    assert len(fallback) == 1 and "logger.init_timeout=5 s" in fallback[0] and "logging offline instead" in fallback[0]
    assert "connection refused" in fallback[0] and "wandb sync" in fallback[0]
    assert (alone / "results.json").is_file() and list((alone / "wandb").glob("offline-run-*"))

    assert runs[stopped].returncode == 130, out[stopped][1][-3000:]
    assert took < 15, f"Ctrl-C took {took:.0f} s to stop the run"
    assert one_line(out[stopped][1]) == (f"error: interrupted by Ctrl-C (SIGINT) before the first checkpoint of "
                                         f"{stopped}: nothing to resume; run again to start over")
    assert "W&B online did not start the run" not in out[stopped][0]  # no offline run started after the Ctrl-C
    assert not list((stopped / "wandb").glob("offline-run-*")) and not (stopped / "last.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# 10. The report
# ---------------------------------------------------------------------------------------------

def job(sweep: Path, name: str, results: str | dict | None, log: str | None = None) -> Path:
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    if results is not None:
        (folder / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    if log is not None:
        (folder / "train.log").write_text(log)
    return folder


def test_the_report_survives_text_metrics_and_lists_corrupt_jobs_as_failed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    job(sweep, "0", {"method": "vanilla", "test/acc": 0.5, "memory/peak_bytes": 2**20})
    job(sweep, "1", {"method": "vanilla", "test/acc": "n/a", "memory/peak_bytes": "oops"})
    job(sweep, "2", '{"method": "wasi", "test/acc": 0.')  # killed while writing
    job(sweep, "3", None, "[2025-01-01 00:00:00,000][experiments.training.errors][ERROR] - trainer.epochs=0: bad\n")
    report.main([str(sweep)])
    md = (sweep / "report" / "report.md").read_text()
    assert "2 runs, 2 failed (below)" in md
    assert "| n/a " in md and "| oops " in md  # the text is shown in the runs table
    summary = md.split("## Summary")[1].split("## Runs")[0]
    assert "| vanilla  | 2      | 50.0 " in summary  # the text values are left out of the mean
    failed = md.split("## Failed jobs")[1]
    assert "| 2     | results.json cannot be read (JSONDecodeError:" in failed
    assert "| 3     | trainer.epochs=0: bad" in failed
    assert report.find_failed(sweep)[0]["run"] == "2"


def test_a_mistyped_sweep_folder_is_one_line_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "multirun" / "2025-01-0l"
    with pytest.raises(SystemExit) as info:
        report.main([str(missing)])
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err) == (f"error: {missing} is not a folder. Fix: pass a sweep folder, "
                                                 "e.g. multirun/<date>/<time>")
    assert not (tmp_path / "multirun").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_report_needs_a_sweep(tmp_path):
    run = lambda *args: subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    refused = run("report")  # -n: print the recipe, run nothing (the refusal comes before any of it)
    assert refused.returncode == 2 and "make report needs SWEEP=<a sweep folder>" in refused.stderr
    given = run("report", f"SWEEP={tmp_path}")
    assert given.returncode == 0 and f"-m experiments.report {tmp_path}" in given.stdout


# ---------------------------------------------------------------------------------------------
# 11. Inference from the command line; 12-13. export's one-line errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A vanilla vit_tiny_cpu run folder as train.py leaves it (config, best weights), exported by export_run."""
    cfg = compose("model.kwargs.depth=1", "dataset=digits")
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = models.build_model(cfg.model, int(cfg.dataset.num_classes))
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    checkpoint.save_weights(run_dir / "best.safetensors", model.state_dict())
    return export_tool.export_run(run_dir)


def image_files(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 17, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_inference_prints_class_and_score_per_image(exported, tmp_path, capsys):
    paths = image_files(tmp_path / "images", 3)
    inference.main([str(exported), *map(str, paths), "--top-k", "3", "--batch", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "image\tclass_1\tscore_1\tclass_2\tscore_2\tclass_3\tscore_3"
    # the same images the way the run's evaluation prepares them, through the loaded export
    model = load_exported(exported)
    spec = model.export_spec
    transform = datasets.image_transform(spec.image_size, spec.mean, spec.std)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        probs = model(x).softmax(-1)
    for line, path, p in zip(out[1:], paths, probs):
        cells = line.split("\t")
        assert cells[0] == str(path)
        classes, scores = [int(c) for c in cells[1::2]], [float(s) for s in cells[2::2]]
        assert classes == p.argsort(descending=True)[:3].tolist()
        assert scores == pytest.approx(p.sort(descending=True).values[:3].tolist(), abs=1e-4)
    assert len(out) == 4


def test_inference_refuses_a_missing_folder_or_an_unreadable_image_in_one_line(exported, tmp_path, capsys):
    good = image_files(tmp_path / "images", 1)[0]
    broken = tmp_path / "notes.png"
    broken.write_text("not an image")
    cases = [([str(tmp_path / "nowhere"), str(good)], f"error: {tmp_path / 'nowhere'} does not exist. Fix: pass an "
              "export folder"),
             ([str(tmp_path), str(good)], f"error: {tmp_path / 'model.json'} not found: {tmp_path} is not an export"),
             ([str(exported), str(good), str(broken)], f"error: {broken} cannot be read as an image "
              "(UnidentifiedImageError:"),
             ([str(exported), str(tmp_path / "gone.jpg")], f"error: {tmp_path / 'gone.jpg'} cannot be read as an "
              "image (no such file)"),
             ([str(exported), str(good), "--top-k", "11"], "error: --top-k 11: the model has 10 classes. Fix:")]
    for argv, line in cases:
        with pytest.raises(SystemExit) as info:
            inference.main(argv)
        captured = capsys.readouterr()
        assert info.value.code == 2 and one_line(captured.err).startswith(line), captured.err
        assert captured.out == ""  # refused before any prediction


def test_export_of_a_folder_that_is_no_run_or_never_evaluated_is_one_line(exported, tmp_path, capsys):
    never = tmp_path / "never"
    shutil.copytree(exported.parent / ".hydra", never / ".hydra")
    for folder, line in [(tmp_path / "nowhere", f"error: {tmp_path / 'nowhere'} does not exist."),
                         (exported, f"error: {exported / '.hydra' / 'config.yaml'} not found: {exported} is not a run"),
                         (never, f"error: {never / 'best.safetensors'} not found: the run never finished an "
                          f"evaluation, so it has no weights to export.")]:
        with pytest.raises(SystemExit) as info:
            export_tool.main([str(folder)])
        assert info.value.code == 2 and one_line(capsys.readouterr().err).startswith(line)


def test_export_of_damaged_weights_blames_the_run_not_a_setting(exported, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported.parent / ".hydra", damaged / ".hydra")
    (damaged / "best.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SystemExit) as info:
        export_tool.main([str(damaged)])
    line = one_line(capsys.readouterr().err)
    assert info.value.code == 1
    assert line.startswith(f"error: {damaged / 'best.safetensors'} is not a readable safetensors file (")
    assert "the run's best weights are damaged. Fix:" in line and "model.checkpoint" not in line


def test_exported_weights_and_best_weights_have_the_usual_file_mode(exported, tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.save_weights(tmp_path / "best.safetensors", {"w": torch.ones(2)})
        out = export_tool.export_run(exported.parent, tmp_path / "export")
    finally:
        os.umask(old)
    for file in (tmp_path / "best.safetensors", out / "model.safetensors", out / "model.json"):
        assert oct(file.stat().st_mode & 0o777) == "0o644", file  # safetensors alone writes 0600


# ---------------------------------------------------------------------------------------------
# 12. The benchmark's arguments; Ctrl-C
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, line", [
    (["--batch", "0"], "error: --batch 0: must be at least 1. Fix: --batch 128"),
    (["--eps", "-0.5", "0.8"], "error: --eps -0.5: ε is a share of explained variance, in (0, 1]. Fix: e.g. --eps"),
    (["--methods", "vanilla", "wasl"], "error: --methods wasl: there is no conf/method/wasl.yaml. Fix: --methods "
     "<any of asi, galore,"),
    (["--batch", "100", "--set", "dataset.source.train_size=50"], "error: --batch 100 is larger than the 40 training "
     "items of --data shapes. Fix: --batch 40 or less, or a larger dataset"),
    (["--set", "trainer.epoch=3"], "error: trainer.epoch is not a setting. Fix: did you mean trainer.epochs?"),
    (["--measure", "profile", "--profile-baseline", "nowhere/profile.csv"], "error: --profile-baseline "
     "nowhere/profile.csv: there is no such file. Fix: the profile.csv of an earlier --measure profile run"),
    (["--profile-baseline", __file__], "error: --profile-baseline compares profiles, and --measure has no profile. "
     "Fix: add --measure profile"),
])
def test_bench_refuses_a_wrong_argument_in_one_line_before_building_anything(tmp_path, capsys, monkeypatch, argv,
                                                                              line):
    monkeypatch.setattr(bench, "build_variant", lambda *a, **k: pytest.fail("a variant was built"))
    with pytest.raises(SystemExit) as info:
        bench.cli(["--model", "vit_tiny_cpu", "--out", str(tmp_path / "out"), *argv])
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err).startswith(line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])  # SIG_IGN: a background job's
def test_ctrl_c_twice_stops_at_once_with_status_130_and_one_line(monkeypatch, capsys, inherited):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # errors.main sets it for Hydra; restored after the test
    outer = signal.signal(signal.SIGINT, inherited)

    def training() -> None:  # what train.py's task does, with the loop's StopRequest around the steps
        with errors.logged(), StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: a request, honoured at the next step boundary
            assert stop.requested
            signal.raise_signal(signal.SIGINT)  # the second: at once

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as info:
            errors.main(training)
        assert info.value.code == 130
        assert one_line(capsys.readouterr().err).startswith("error: interrupted by Ctrl-C (SIGINT)")
        assert signal.getsignal(signal.SIGINT) is before  # the handler was given back
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_ctrl_c_during_the_cost_measurement_exits_130_and_resume_writes_the_results(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", *SMALL, "trainer.measure=true", f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([*args, "trainer.timing_repeats=100000"], cwd=ROOT,
                                env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                if "checkpoint: " in line and "step 2)" in line:  # training is over: test, then measure
                    time.sleep(2)
                    proc.send_signal(signal.SIGINT)
                    break
            proc.communicate(timeout=120)
        finally:
            proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert one_line(stderr) == (f"error: interrupted by Ctrl-C (SIGINT) during the cost measurement: {run_dir}/"
                                "results.json holds the accuracy, not yet the cost. Measure it with the same overrides "
                                f"plus hydra.run.dir={run_dir} resume=true (nothing is trained again)")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "best.safetensors", "last.ckpt", "metrics.jsonl",
                                                         "results.json", "train.log"]
    tested = json.loads((run_dir / "results.json").read_text())
    assert "test/acc" in tested and "flops/train_step" not in tested
    train(*SMALL, "trainer.measure=true", "trainer.timing_repeats=1", f"hydra.run.dir={run_dir}", "resume=true")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 2 and results["flops/train_step"] > 0  # no step trained again
    assert results["test/acc"] == tested["test/acc"]


def test_results_json_holds_the_accuracy_before_the_cost_is_measured(tmp_path, monkeypatch):
    """A Ctrl-C (here: the measurement raising KeyboardInterrupt) keeps the tested accuracy on disk, and the
    line on the terminal says what is missing and how to get it without training again."""
    from experiments import run as run_module
    from experiments.measurement import metrics

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "measure", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_module.run(compose(*SMALL, "trainer.measure=true", run_dir=run_dir))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 2 and 0 <= results["test/acc"] <= 1 and "flops/train_step" not in results
    assert not run_folder.finished(results)
    assert errors.interrupted(run_dir).startswith(f"interrupted by Ctrl-C (SIGINT) during the cost measurement: "
                                                  f"{run_dir}/results.json holds the accuracy, not yet the cost.")


# ---------------------------------------------------------------------------------------------
# 13. Settings that do not fit the data, the model, the network or the disk
# ---------------------------------------------------------------------------------------------

def dataset_cfg(name: str, *overrides: str):
    """conf/dataset/<name>.yaml as train.py composes it (its schema's defaults included), with overrides."""
    return compose(f"dataset={name}", *overrides).dataset


def shapes_cfg(**top):
    return dataset_cfg("shapes", "dataset.source.train_size=40", "dataset.source.test_size=20",
                       "dataset.source.resolution=16", *[f"dataset.{k}={v}" for k, v in top.items()])


def test_num_classes_below_the_labels_is_refused_when_the_data_is_built():
    with pytest.raises(ConfigError) as info:
        instantiate(shapes_cfg(num_classes=5))(image_size=8, seed=0)
    assert errors.one_line(info.value) == ("dataset.num_classes=5: the train labels of shapes go up to 9, so it has "
                                           "at least 10 classes. Fix: dataset.num_classes=10")
    assert errors.status(info.value) == errors.SETTING


def test_an_image_folder_with_3_classes_is_refused_a_200_class_head(tmp_path):
    for split in ("train", "test"):
        for name in ("001.a", "002.b", "003.c"):
            (tmp_path / "cub200" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "cub200" / split / name / "0.png")
    cfg = dataset_cfg("cub200", f"dataset.source.root={tmp_path}")
    with pytest.raises(ValueError) as info:
        instantiate(cfg)(image_size=8, seed=0)
    assert errors.one_line(info.value) == ("dataset.num_classes=200: the training split of cub200 has 3 classes "
                                           "(001.a, 002.b, 003.c). Fix: dataset.num_classes=3")
    cfg.num_classes = 3
    assert instantiate(cfg)(image_size=8, seed=0).num_classes == 3


def test_an_image_size_the_model_does_not_take_is_refused_when_it_is_built(make_cfg):
    cfg = make_cfg("model=swin_t", "model.pretrained=false", "model.image_size=32")
    with pytest.raises(ValueError) as info:
        models.build_model(cfg.model, 10)
    assert errors.one_line(info.value) == (
        "model.image_size=32: swin_tiny_patch4_window7_224 is built for 224x224 images (AssertionError: Input height "
        "(32) doesn't match model (224).). Fix: model.image_size=224, or +model.kwargs.img_size=32 to build it for "
        "32x32")
    assert errors.status(info.value) == errors.SETTING
    fixed = make_cfg("model=swin_t", "model.pretrained=false", "model.image_size=32", "+model.kwargs.img_size=32")
    assert models.build_model(fixed.model, 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)  # the fix works


def test_a_download_without_a_network_names_the_dataset_setting_and_the_offline_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = dataset_cfg("cifar10", f"dataset.source.root={tmp_path}", "dataset.source.download=true")
    with pytest.raises(datasets.DatasetNotFoundError) as info:
        instantiate(cfg)(image_size=8, seed=0)
    line = errors.one_line(info.value)
    assert line.startswith(f"DatasetNotFoundError: CIFAR10 cannot be downloaded into {tmp_path}/cifar-10-batches-py "
                           "(dataset.source.download=true; URLError: <urlopen error [Errno -2] Name or service not "
                           "known>): this machine is offline. Fix: on a machine with internet")
    assert "paths.data_dir=/path" in line


READ_ONLY_PROBE = """
import logging, logging.config, os, sys
from experiments.training import errors
log_file = sys.argv[1]
if os.geteuid() == 0:  # root writes anywhere: refuse the open as a read-only folder refuses it
    def denied(self):
        raise PermissionError(13, "Permission denied", self.baseFilename)
    logging.FileHandler._open = denied
try:  # what Hydra does with conf/config.yaml's job_logging when a run starts
    logging.config.dictConfig({"version": 1, "handlers": {"file": {"class": "logging.FileHandler",
                                                                     "filename": log_file}}})
except ValueError as err:
    print(errors.status(err), errors.one_line(err))
"""


def test_a_read_only_run_folder_is_said_so_with_the_setting_that_moves_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir(mode=0o500)  # read-only for its owner (root alone ignores it: the probe then refuses the open)
    try:
        probe = subprocess.run([sys.executable, "-c", READ_ONLY_PROBE, str(folder / "train.log")], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o700)
    assert probe.stdout.strip() == (f"2 cannot write {folder / 'train.log'} (Permission denied): the run folder "
                                    f"{folder} is read-only. Fix: make it writable, or pass hydra.run.dir=<a "
                                    "writable folder>"), probe.stderr[-2000:]
    assert errors.one_line(ValueError("Unable to configure handler 'file'")) != probe.stdout  # not any ValueError


def test_a_run_folder_in_a_read_only_place_is_refused_before_hydra_writes(tmp_path, monkeypatch):
    read_only = tmp_path / "shared"
    read_only.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere but on a read-only mount: answer as such a mount does
        real_access = os.access
        monkeypatch.setattr(run_folder.os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    try:
        with pytest.raises(errors.RunFailed) as info:  # what Hydra calls on_run_start with, before any file
            run_folder.RunFolderCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": f"{read_only}/run"}}}))
    finally:
        read_only.chmod(0o700)
    assert info.value.code == 2 and info.value.line == (
        f"hydra.run.dir={read_only}/run: {read_only} is read-only, so the run cannot write its files there. Fix: make "
        "it writable, or pass hydra.run.dir=<a writable folder>")
    assert list(read_only.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 14. Silent oddities
# ---------------------------------------------------------------------------------------------

def test_more_threads_than_cpus_warns_once_naming_the_cpu_count(monkeypatch, caplog):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cpus = usable_cpus()
    with caplog.at_level(logging.WARNING, logger="experiments.training.hardware"):
        setup_hardware(OmegaConf.create({"device": "cpu", "threads": 1000}))
        setup_hardware(OmegaConf.create({"device": "cpu", "threads": cpus}))
    assert threads == [1000, cpus]
    assert [r.getMessage() for r in caplog.records] == [
        f"hardware.threads=1000 is more than the {cpus} CPUs this process may use: the threads take turns and every "
        f"step runs slower. Fix: hardware.threads={cpus} (or fewer)"]


@pytest.mark.parametrize("flags, key", [([], "hydra.run.dir"), (["-m"], "hydra.sweep.dir")])
def test_an_empty_run_folder_is_refused_before_anything_is_written(tmp_path, flags, key):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *SMALL, f"{key}="], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (f"error: {key}=: names no folder, so the run would write into the current one. "
                                     f"Fix: drop {key} (Hydra's default folder under outputs/ or multirun/), or "
                                     f"{key}=<a folder>")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # make test-slow
def test_the_suite_installs_as_packages_and_runs_from_any_folder(tmp_path):
    """The wheel of this repository holds every package of the suite; installed alone (no repository on the
    path), `python -m experiments.bench --help` runs from any folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("wasi", "experiments"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl")))
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "experiments").rglob("*.py")} | {"wasi"}
    assert packages <= {str(Path(n).parent) for n in wheel.namelist()}
    site = tmp_path / "site"
    wheel.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**ENV, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-m", "experiments.bench", "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "--methods" in probe.stdout, probe.stderr[-2000:]


@pytest.mark.parametrize("make_error", [
    lambda tmp: checkpoint.resume_path(True, tmp),
    lambda tmp: models.read_state_dict(tmp / "weights.safetensors"),
    lambda tmp: datasets.split_indices(10, 1.5, 0),
    lambda tmp: datasets.training_subset([0] * 4, np.arange(4) % 2, 0, "dataset.source.train_size"),
    lambda tmp: datasets.isic2018(str(tmp), test_split="val"),
    lambda tmp: setup_hardware(OmegaConf.create({"device": "cuda", "threads": None})) if not
    torch.cuda.is_available() else pytest.skip("a CUDA device is visible"),
], ids=["resume", "model.checkpoint", "dataset.val_fraction", "dataset.source.train_size",
        "dataset.source.test_split", "hardware=cuda"])
def test_every_setting_error_exits_2_with_the_setting_first(tmp_path, make_error):
    with pytest.raises(Exception) as info:
        make_error(tmp_path)
    line = errors.one_line(info.value)
    assert errors.status(info.value) == errors.SETTING, line
    assert line.split("=")[0] in {"resume", "model.checkpoint", "dataset.val_fraction", "dataset.source.train_size",
                                  "dataset.source.test_split", "hardware"} and "Fix: " in line, line
