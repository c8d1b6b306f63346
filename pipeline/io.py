"""Files: atomic writes, deterministic npz, run manifests, per-image error logs and output-folder locks.

Every stage writes through these helpers so that a killed run never leaves a half-written
file, a re-run can tell finished work from stale work, two runs never write into one folder,
and nothing needs pickle to read.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

MANIFEST = "manifest.json"
ERRORS = "errors.json"
LOCK = ".lock"
# Fixed zip member timestamp: identical arrays give byte-identical .npz files.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class StaleOutputError(RuntimeError):
    """An output folder holds results made with another configuration."""


class FolderInUse(RuntimeError):
    """Another run that is still alive writes into the output folder."""


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it; the lock keeps threads from seeing 0)."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temp file next to ``path``; on success fsync and rename it onto ``path``.

    On any exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; outputs get what open() would give them under the user's umask
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write (disk full): name the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise arrays as an uncompressed .npz (readable with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.hasobject:
                raise TypeError(f"array {name!r} has dtype object; refusing to pickle")
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), member.getvalue())
    return buf.getvalue()


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` to ``path`` as a deterministic .npz."""
    write_bytes(path, npz_bytes(arrays))


class BackgroundWriter:
    """Runs write calls in ``threads`` threads while the caller goes on (a device loop that would
    otherwise wait for every encode, fsync and rename), at most ``window`` of them pending.

    The first failed write stops the writing (a full disk fails every later write alike; writes not yet
    started are dropped) and is raised by the next ``submit`` or by leaving the ``with`` block.
    """

    def __init__(self, threads: int = 4, window: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="writer")
        self._room = threading.Semaphore(window or 8 * max(1, threads))
        self._lock = threading.Lock()
        self._failure: BaseException | None = None

    def submit(self, fn, *args) -> None:
        """Call ``fn(*args)`` in a writer thread; waits while ``window`` calls are pending."""
        self._raise_failure()
        self._room.acquire()
        self._pool.submit(self._run, fn, args)

    def _run(self, fn, args) -> None:
        try:
            if self._failure is None:
                fn(*args)
        except BaseException as e:
            with self._lock:
                self._failure = self._failure or e
        finally:
            self._room.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Wait for every pending write; raise the first failure unless another exception is on its way."""
        self._pool.shutdown(wait=True)
        if exc_type is None:
            self._raise_failure()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of an .npz without pickle; raises ``ValueError`` naming the file if corrupt."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise ValueError(f"{path}: unreadable .npz ({error_detail(e)}); delete it and re-run the stage") from e


# Library texts that advise unsafe loading; never passed on to the user.
_UNSAFE_ADVICE = ("weights_only", "allow_pickle", "trust the source")


def error_detail(e: BaseException) -> str:
    """``e`` as 'Type: first sentence' (whole sentences only), without library text that advises
    unsafe loading (torch's weights_only=False, numpy's allow_pickle=True)."""
    lines = str(e).strip().splitlines()
    text = re.split(r"(?<=[.!?])\s", lines[0], maxsplit=1)[0].rstrip(".") if lines else ""
    if any(w in text for w in _UNSAFE_ADVICE):
        text = ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class UnreadableWeights(ValueError):
    """A weights file that cannot be read safely; the message names the file and the fix."""


def torch_load(path: str | os.PathLike, fix: str = "download or copy it again") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``UnreadableWeights`` with one whole sentence
    naming the file otherwise (empty, truncated, not a torch file, or holding non-tensor objects)."""
    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise UnreadableWeights(f"{path}: the file is empty (0 bytes); {fix}")
    kind = archive_kind(path)
    if kind == "torchscript":
        raise UnreadableWeights(f"{path}: this is a TorchScript model archive (OpenAI's CLIP ViT-B-16.pt is one), "
                                f"not a file of weights of this kind; {fix}")
    if kind == "npz":
        raise UnreadableWeights(f"{path}: this is a NumPy .npz archive (a CAM file or an attribute bank, say), not "
                                f"a PyTorch file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects besides tensors, which are not loaded because unpickling them can run code"
               if any(w in str(e) for w in _UNSAFE_ADVICE) else f"it is not a PyTorch file ({error_detail(e)})")
        raise UnreadableWeights(f"{path}: cannot read weights: {why}; {fix}") from None
    except Exception as e:  # truncated zip, EOF, foreign format ...
        raise UnreadableWeights(f"{path}: cannot read weights, the file is truncated or not a PyTorch file "
                                f"({error_detail(e)}); {fix}") from None


def archive_kind(path: str | os.PathLike) -> str | None:
    """'torchscript' (a zip holding compiled code, as OpenAI's CLIP files), 'npz' (NumPy arrays only),
    'zip' (another zip, such as torch.save's) or None (not a zip)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """``git describe`` of the checkout this code runs from, or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_output_folder(path: str | os.PathLike) -> Path:
    """``path`` as an output folder; ``ValueError`` naming it when it, or a folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{p}: is a file, not a folder; choose another output folder (--out)")
            break
    return path


def holds_outputs(out_dir: str | os.PathLike, pattern: str = "*") -> bool:
    """Whether ``out_dir`` holds a finished output matching ``pattern`` (the manifest, errors.json and
    hidden temp files do not count)."""
    return any(p.is_file() and p.name not in (MANIFEST, ERRORS) and not p.name.startswith(".")
               for p in Path(out_dir).glob(pattern))


def check_manifest(out_dir: str | os.PathLike, config: Mapping[str, Any], overwrite: bool = False,
                   outputs: str = "*") -> bool:
    """Refuse to mix outputs: compare ``config`` with ``<out_dir>/manifest.json``.

    Returns True when the folder already holds outputs of this very config (resume), False when it
    is new or ``overwrite`` allows replacing a different config. Raises ``StaleOutputError`` otherwise.
    A manifest binds the folder only once some output (files matching ``outputs``) was finished: a
    first run that failed before finishing anything never locks its folder.
    """
    path = Path(out_dir) / MANIFEST
    if not path.exists() or not holds_outputs(out_dir, outputs):
        return False
    try:
        old = json.loads(path.read_text()).get("config")
    except (OSError, ValueError) as e:
        if overwrite:
            return False
        raise StaleOutputError(f"{path}: unreadable manifest ({e}); pass --overwrite to start this folder afresh") from e
    new = json.loads(json.dumps(dict(config), sort_keys=True, default=_json_default))
    if old == new:
        return True
    if overwrite:
        return False
    old_flat, new_flat = _flatten(old or {}), _flatten(new)
    diff = sorted(k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k))
    raise StaleOutputError(
        f"{out_dir} holds outputs made with a different configuration (differs in: {', '.join(diff)}). "
        "Use another --out folder, or pass --overwrite to replace them.")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'cam': {'exact': True}} -> {'cam.exact': True}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_manifest(out_dir: str | os.PathLike, config: Mapping[str, Any], **extra: Any) -> None:
    """Write ``<out_dir>/manifest.json`` with the config that made the outputs plus ``extra`` fields."""
    write_json(Path(out_dir) / MANIFEST, {"config": dict(config), "code_version": code_version(), **extra})


def write_errors(out_dir: str | os.PathLike, errors: Mapping[str, str]) -> None:
    """Write ``<out_dir>/errors.json`` ({image_id: message}); remove it when there are none."""
    path = Path(out_dir) / ERRORS
    if errors:
        write_json(path, dict(sorted(errors.items())))
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------------------- one writer per folder
_HELD: dict[str, list[int]] = {}  # lock file (real path) -> [fd, depth] of the locks this process holds


def run_key() -> str | None:
    """What the processes of one torchrun run share and no other live run has: its run id and the
    address of its rendezvous store (a port only one live run can hold). None for a single process."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    return f"{env.get('TORCHELASTIC_RUN_ID', '')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


@contextlib.contextmanager
def _flock(fd: int, what: str, timeout: float = 30.0) -> Iterator[None]:
    """An exclusive ``flock`` on ``fd`` for the length of the block (waits up to ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise FolderInUse(f"{what}: another process keeps the folder locked; try again") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, name: str = LOCK, flag: str = "--out") -> Iterator[Path]:
    """Hold ``<folder>/<name>`` for the block: the one writer of ``folder`` (created if needed, and
    removed again if the block wrote nothing into it).

    An OS lock (``flock``), so the kernel releases it when the process dies, SIGKILL included, and
    no stale lock survives a run. The file names the holder's pid and command line; a second run
    gets ``FolderInUse`` quoting them. The processes of one torchrun run (same ``run_key``) share
    the lock, each holding it until it exits, so a new run is refused while any of them lives.
    Re-entrant within a process; forked workers inherit it.

    Every holder keeps a shared lock on the file. The folder's own lock serialises taking and removing
    it: a free file is taken (exclusively, to know nobody holds it, then shared) by one process at a time.
    """
    folder = check_output_folder(folder)
    path = folder / name
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    fd = _acquire(folder, path, flag)
    _HELD[key] = [fd, 1]
    try:
        yield folder
    finally:
        del _HELD[key]
        _release(fd, folder, path, made)


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[bool]:
    """The folder's own lock for the block; yields False when the folder was removed (or replaced)
    before the lock was had, so that the caller starts again."""
    try:
        gate = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield False
        return
    try:
        with _flock(gate, str(folder)):
            try:
                same = os.stat(folder).st_ino == os.fstat(gate).st_ino
            except FileNotFoundError:
                same = False
            yield same
    finally:
        os.close(gate)


def _acquire(folder: Path, path: Path, flag: str) -> int:
    """Make ``folder`` and take (or join) its lock file -> the open file descriptor holding it."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        with _folder_locked(folder) as ok:
            if not ok:
                continue  # a run that wrote nothing was removing the folder: make it again
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                _take(fd, path, folder, flag)
            except BaseException:
                os.close(fd)
                raise
            return fd


def _release(fd: int, folder: Path, path: Path, made: list[Path]) -> None:
    """Give the lock up; a folder this run made and left empty (but for the lock) is removed, with the
    parents it made, unless another process of the run still holds the lock."""
    try:
        if made:
            with contextlib.suppress(OSError, FolderInUse), _folder_locked(folder) as ok:
                if ok and os.listdir(folder) == [path.name]:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: not the last holder
                    os.unlink(path)
                    for p in made:
                        os.rmdir(p)  # OSError once a folder is not empty: keep it and those above
    finally:
        os.close(fd)  # releases the lock (inherited copies in live workers keep it until they end)


def _take(fd: int, path: Path, folder: Path, flag: str) -> None:
    """Under the folder's lock: take ``path`` (fd) as its first holder, or join the run holding it."""
    me = run_key()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if me is None or holder.get("run") != me:
            command = " ".join(str(holder.get("command", "?")).split())  # one line, however it was typed
            who = (f"pid {holder['pid']}: {command[:300]}{'...' if len(command) > 300 else ''}" if "pid" in holder
                   else "its pid is not recorded yet")
            raise FolderInUse(f"{folder}: another run is writing into this folder ({who}); wait for it to "
                              f"finish or stop it, or choose another output folder ({flag})") from None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only shared holders: never blocks
        return
    fcntl.flock(fd, fcntl.LOCK_SH)  # no other process can take the file meanwhile: the folder is locked
    info = json.dumps({"pid": os.getpid(), "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
                       "run": me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)


def _holder(fd: int) -> dict[str, Any]:
    """The record of the run holding a lock file ({} when unreadable)."""
    try:
        doc = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}
