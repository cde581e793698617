"""Reads an offline W&B run file (run-*.wandb) independently of the wandb client.

The file is a ':W&B' header (7 bytes) followed by LevelDB-log framed records (32 KiB blocks,
7-byte chunk headers: crc32, length, type 1=full 2=first 3=middle 4=last), each a protobuf Record.
"""
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: Path):
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B run file"
    pos, chunk = 7, b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def summary(run_dir: Path) -> dict:
    """The last summary value of every key in the run's offline W&B file."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def offline_runs(run_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """{folder name: (W&B run id, history steps in order)} of every offline run folder in run_dir/wandb."""
    out = {}
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        run_id, steps = None, []
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                steps.append(record.history.step.num)
        out[path.parent.name] = (run_id, steps)
    return out
