"""Worker processes that never outlive the stage that started them.

A killed stage (SIGKILL, OOM killer) cannot shut its pool down; without this its CRF workers would
keep labelling and writing files for minutes. On Linux the kernel kills each worker when its parent
dies (``PR_SET_PDEATHSIG``); elsewhere a watchdog thread exits once the parent is gone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_armed = False


def die_with_parent(parent: int | None = None) -> None:
    """Make this process exit when its parent does (idempotent; call in each worker). ``parent``: the pid
    of the process that started this one, taken there; a parent killed before this call then ends this
    process too (``os.getppid()`` read here would already name its successor)."""
    global _armed
    if _armed:
        return
    _armed = True
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def worker_init(parent: int | None = None) -> None:
    """Initializer of the CRF worker processes (``initargs=(os.getpid(),)``): death with the parent, armed
    first, and one OpenCV (and torch) thread each (a worker handles one image; a library's own pool
    would only oversubscribe the cores)."""
    die_with_parent(parent)
    import cv2

    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read when the torch CRF backend first loads torch in this worker
