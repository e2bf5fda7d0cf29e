"""Output folders and files that nothing else may write at the same time, and write failures (full
disk, quota, read-only filesystem) turned into one line a user can act on.

* :class:`OutputLock` — an exclusive ``fcntl.flock`` on a lock file (``OUT/.qlora.lock`` for a
  training run, ``NAME.lock`` beside a single output such as a GGUF file or a merged folder),
  holding ``{"pid", "host"}`` of its owner. The kernel drops the lock when the process dies, so a
  run killed with ``kill -9`` leaves no stale lock (at most the file, which the next run takes).
  A second writer fails at once, naming the holder's PID and host.
* :func:`prepare_run_dir` — the checks on a training ``--output`` (a file, a dangling symlink, a
  previous run, a folder of other files, symlinks where a run writes), the lock, and ``--overwrite``
  as a deferred :meth:`RunDir.clear`, called only once every check that can fail has passed; it
  removes only the names a run writes (:data:`RUN_NAMES`) and never follows a symlink.
* :func:`guard_write` — a context manager that turns ENOSPC/EDQUOT/EROFS/EACCES/EFBIG while writing
  into a :class:`QLoraError` naming the path, the bytes needed (when known) and free, after removing
  the temporary files, and naming the last good checkpoint when there is one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path

from .errors import QLoraError

LOCK_NAME = ".qlora.lock"
# what a training run writes into its folder (qlora/train.py, --precompute-ref's reference log-probs,
# trackers, reports): the only names
# --overwrite removes; temp names of atomic writes (.adapter.tmp-*, loss.tmp.png) count too
RUN_NAMES = frozenset({"config.yaml", "metrics.jsonl", "loss.png", "loss.tmp.png", "checkpoints", "adapter",
                       "report.html", "report.md", "tb", "wandb", "mlruns", "ref_logps.safetensors",
                       "validation.json", "data_stats.json", "answers.json",  # qlora/validation.py
                       "qlora_base.safetensors"})  # the LoftQ/PiSSA base (qlora.variants.BASE_FILE)
_RUN_TEMP = re.compile(r"^\.(adapter\.(tmp|old)|ref_logps\.safetensors\.tmp|qlora_base\.safetensors\.tmp)-"
                       r"|^(validation|data_stats|answers)\.json\.tmp$|^report\.(html|md)\.tmp$")

_WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for the file system"}
SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})  # never raised by a read


# ---------------------------------------------------------------------------------------------
# the lock


class OutputLock:
    """An exclusive OS lock on ``path`` (created if missing) for the life of a run; ``what`` names
    the output in the message a second run gets. Use as a context manager, or call :meth:`release`."""

    _held: dict = {}  # realpath -> [OutputLock, count]: this process's locks (see _acquire)

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.fd, self.owner = Path(path), None, None
        key = os.path.realpath(self.path)
        held = OutputLock._held.get(key)
        if held is not None:  # a nested user in this process (a command and the library call it makes):
            held[1] += 1      # a second flock of ours would conflict with the first one
            self.owner = held[0]
            return
        self._acquire(what)
        OutputLock._held[key] = [self, 1]

    def _acquire(self, what: str) -> None:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise write_error(e, self.path) or QLoraError(f"cannot create the lock file {self.path}: "
                                                              f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise QLoraError(f"{what} is in use by another qlora process ({holder}; lock file {self.path}): "
                                 "wait for it to finish, or choose another output") from None
            # the previous holder may have removed the file between our open and our lock: then we
            # hold a lock on a file nobody else can see, so start again on the path's current file
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode())

    def release(self) -> None:
        """Drop this hold; the last one removes the lock file, then drops the OS lock (in that order:
        see the inode check in _acquire). Releasing twice does nothing."""
        owner, self.owner = self.owner or self, False
        key = os.path.realpath(owner.path)
        held = OutputLock._held.get(key)
        if owner is False or held is None or held[0] is not owner:
            return
        held[1] -= 1
        if held[1] == 0:
            del OutputLock._held[key]
            with contextlib.suppress(OSError):
                owner.path.unlink()
            os.close(owner.fd)
            owner.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown: it has only just started"


def lock_beside(out: str | os.PathLike, what: str | None = None) -> OutputLock:
    """The lock of a single output (a file, or a folder written elsewhere and renamed into place):
    ``NAME.lock`` in the same folder (created if missing)."""
    out = Path(out).expanduser()
    with guard_write(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    return OutputLock(out.with_name(out.name + ".lock"), what or f"output {out}")


# ---------------------------------------------------------------------------------------------
# a training run's folder


class RunDir:
    """A locked training ``--output``; :meth:`clear` carries out ``--overwrite``."""

    def __init__(self, path: Path, lock: OutputLock, to_clear: list[Path]):
        self.path, self.lock, self.to_clear = path, lock, to_clear

    def clear(self) -> None:
        """Remove the previous run's files (only names in RUN_NAMES; a symlink is removed as a link,
        never followed). Call once every check that can fail before training has passed."""
        for p in self.to_clear:
            with guard_write(p):
                if p.is_symlink() or not p.is_dir():
                    p.unlink(missing_ok=True)
                else:
                    shutil.rmtree(p)  # does not follow symlinks inside (it unlinks them)
        self.to_clear = []


def _is_run_name(name: str) -> bool:
    return name in RUN_NAMES or bool(_RUN_TEMP.match(name))


def check_output_path(out: Path, flag: str = "--output") -> None:
    """Refuse an output that is a file or a dangling symlink."""
    if out.is_symlink() and not out.exists():
        raise QLoraError(f"{flag} {out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                         "create that folder or give another path")
    if out.exists() and not out.is_dir():
        raise QLoraError(f"{flag} {out} is a file, not a folder")


def prepare_run_dir(output: str | os.PathLike | None, resume: bool, overwrite: bool) -> RunDir:
    """Check and lock a training ``--output`` (see the module docstring); nothing is removed here."""
    if not output:
        raise QLoraError("--output DIR is required")
    out = Path(output).expanduser()
    check_output_path(out)
    with guard_write(out):
        out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out / LOCK_NAME, f"--output {out}")
    try:
        entries = sorted(p for p in out.iterdir() if p.name != LOCK_NAME)
        ours = [p for p in entries if _is_run_name(p.name)]
        foreign = [p.name for p in entries if not _is_run_name(p.name)]
        links = [p.name for p in ours if p.is_symlink()]
        if links:
            raise QLoraError(f"{out / links[0]} is a symbolic link where a run writes its own files; qlora never "
                             "writes or deletes through a link: remove it or choose another --output")
        # a folder holding only the config.yaml of a run that stopped before its first step is free
        previous = any(p.name != "config.yaml" for p in ours)
        if previous and not (resume or overwrite):
            raise QLoraError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
        if foreign and not previous and not (resume or overwrite):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise QLoraError(f"{out} is not empty and holds no qlora run ({shown}): choose a new or empty folder, "
                             "or pass --overwrite to write the run beside those files (they are kept)")
        if resume and not (out / "checkpoints").is_dir():
            raise QLoraError(f"--resume: {out} has no checkpoints to resume from")
    except BaseException:
        lock.release()
        raise
    return RunDir(out, lock, ours if overwrite and not resume else [])


# ---------------------------------------------------------------------------------------------
# write failures


def write_errno(e: BaseException, codes=None) -> int | None:
    """The errno of a failed write we explain to the user (full disk, quota, read-only, permission),
    from an OSError or from safetensors' SafetensorError (which carries it only in its text)."""
    if isinstance(e, OSError):
        code = e.errno
    elif type(e).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    else:
        return None
    return code if code in (codes or _WRITE_ERRORS) else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(e: BaseException, path, needed: int | None = None, last_good=None,
                codes=None) -> QLoraError | None:
    """A one-line QLoraError for a failed write of ``path``, or None when ``e`` is not one we explain
    (``codes``: the errnos to explain, default all of _WRITE_ERRORS)."""
    code = write_errno(e, codes)
    if code is None:
        return None
    where = getattr(e, "filename", None) or path
    msg = f"cannot write {where}: {_WRITE_ERRORS[code]}"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(path)
        sizes = ([f"needs about {human_bytes(needed)}"] if needed else []) + \
                ([f"{human_bytes(free)} free there"] if free is not None else [])
        msg += f" ({', '.join(sizes)})" if sizes else ""
    if last_good is not None:
        good = last_good() if callable(last_good) else last_good
        msg += f"; last good checkpoint: {good or 'none'}"
    return QLoraError(msg)


@contextlib.contextmanager
def guard_write(path, needed: int | None = None, cleanup=(), last_good=None, codes=None):
    """Inside: writes of ``path``. A full disk, quota, read-only filesystem or permission error
    removes ``cleanup`` (temp files or folders; an iterable or a callable giving one) and becomes
    one QLoraError (see :func:`write_error`); ``last_good``: a checkpoint (or a callable giving it) to
    name; ``codes``: the errnos to explain (default: all above; SPACE_ERRORS where a read may fail
    too). Other errors pass through unchanged."""
    try:
        yield
    except Exception as e:
        err = write_error(e, path, needed, last_good, codes)
        if err is None:
            raise
        for p in (cleanup() if callable(cleanup) else cleanup):
            remove_quietly(p)
        raise err from None


def remove_quietly(p) -> None:
    """Remove a temp file or folder of ours; a symlink is unlinked, never followed."""
    p = Path(p)
    with contextlib.suppress(OSError):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
