"""Writing a run's files: atomically, with the permissions of every other output, and a full disk said as such.

`atomic(path)` yields a temporary path next to `path`; what the caller writes there replaces `path` only once
it is complete (fsync, os.replace), so a crash or a full disk leaves the previous file as it was, and no
temporary file behind. The file gets the mode a plain `open` would give it (0644 under the usual umask 022):
safetensors writes its files 0600.

A full disk surfaces in three forms: OSError ENOSPC (or EDQUOT, over quota) from Python, safetensors'
`SafetensorError: ... No space left on device (os error 28)`, and torch.save's `RuntimeError: [enforce fail at
inline_container.cc:...] . unexpected pos ...` (its zip writer notices the short write). `atomic` turns each
into DiskFullError, whose one line names the file, the folder, the free space and what is left intact.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path

#: Messages of a write that hit a full disk, from writers that do not raise OSError (safetensors, torch).
FULL_DISK_MESSAGES = re.compile(r"No space left on device|os error (28|122)\b|Disk quota exceeded|unexpected pos \d+"
                                r"|PytorchStreamWriter failed writing file")


class DiskFullError(OSError):
    """A file could not be written because its disk is full (or over quota); the previous file is intact."""


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a write that ran out of space."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and FULL_DISK_MESSAGES.search(str(e)):
            return True
    return False


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the process's umask."""
    status = Path("/proc/self/status")
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        line = next(line for line in status.read_text().splitlines() if line.startswith("Umask:"))
        return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)  # no /proc: read it by setting it, and put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def disk_full(path: Path, fix: str) -> DiskFullError:
    """DiskFullError for a failed write of `path`: what is full, how much is free, what was kept, and `fix`."""
    folder = path.parent.resolve()
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is intact" if path.exists() else f"there was no earlier {path.name}"
    err = DiskFullError(f"the disk holding {folder} is full ({free}): {path} could not be written; {kept}. Fix: {fix}")
    err.errno = errno.ENOSPC
    return err


def resume_fix(run_dir: Path) -> str:
    """How to go on after a write into the run folder `run_dir` failed for want of space: its last.ckpt, if
    there is one, is intact (written atomically), and `resume=true` continues from it."""
    then = (f"continue with the same overrides plus hydra.run.dir={run_dir} resume=true"
            if (run_dir / "last.ckpt").is_file() else "run again")
    return f"free space there (or move the run folder to a disk with room), then {then}"


@contextlib.contextmanager
def atomic(path: Path, fix: str = "free space on that disk, then run again") -> Iterator[Path]:
    """Yields `path` + ".tmp" to write; then fsync, give it the usual file mode and os.replace it onto `path`.
    On any failure the temporary file is removed and `path` keeps its previous content; a full disk raises
    DiskFullError (its message ends with `fix`)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # a file system without modes (FAT, some network mounts) keeps its own
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err):
            chained: BaseException | None = err
            while chained is not None:  # drop the failed writer's locals: torch's zip writer keeps the file open
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__context__
            tmp.unlink(missing_ok=True)  # then its space is free again, and the message counts it so
            raise disk_full(path, fix) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
