"""Pseudo labels with the torch CRF on one device, in batches: ``jobs`` threads read and prepare images
(decode, CAMs, upsampling, background row, guide) and write the label PNGs, while one thread sends batches
of the images that are ready, grouped by number of labels, through unary, CRF and confidence rule on the
device (``crf.batch.refine_batch``). The device waits for no decoder and labels no image alone while
others wait (it takes what is ready; a partial group goes when nothing more is being prepared).

At most ``window`` images are between ``submit`` and their written PNG (``submit`` waits for room, which
bounds memory and paces a producer such as the CAM stage). A failed write stops the run and is raised by
the next ``submit`` or by ``close``: every later write would fail the same way (a full disk).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .crf.batch import refine_batch, unary_table


@dataclass
class Item:
    """One image on its way: to the device (``probs`` float16 (C, H, W) background first and checked,
    ``guide`` uint8 (H, W, 3), ``values`` uint8 (C,) label of each channel; host tensors), or already
    labelled (``label`` uint8 (H, W)), or failed (``error``, its one-line message)."""

    image_id: str
    out: str
    probs: Any = None
    guide: Any = None
    values: Any = None
    label: np.ndarray | None = None
    error: str | None = None


_CLOSE = object()


class DeviceLabeller:
    """``submit(*args)`` runs ``prepare(*args) -> Item`` in a thread; prepared items are labelled on
    ``device`` in batches of up to ``batch`` images of one label count with ``params`` (``CRFParams``),
    ``conf`` and ``confidence`` (as ``crf.refine``); ``write(out, label)`` runs in a thread.
    ``on_result(image_id, error or None)`` is called once per image, one call at a time (the output of a
    failed image is removed: no label from an older run stays). ``close()`` waits for every image and
    raises the first failed write (or error of this machinery), if any."""

    def __init__(self, prepare: Callable[..., Item], write: Callable[[str, np.ndarray], None],
                 on_result: Callable[[str, str | None], None], *, params, conf: float, confidence: str,
                 device: str = "cpu", jobs: int = 1, batch: int = 8, window: int | None = None):
        self.prepare, self.write, self.on_result = prepare, write, on_result
        self.params, self.conf, self.confidence = params, conf, confidence
        self.device, self.batch = torch.device(device), max(1, batch)
        self.pin = self.device.type == "cuda"  # page-locked host copies go to the GPU asynchronously
        self.window = window or 4 * self.batch + 2 * jobs
        self.room = threading.Semaphore(self.window)
        self.readers = ThreadPoolExecutor(jobs, thread_name_prefix="pseudo-read")
        self.writers = ThreadPoolExecutor(jobs, thread_name_prefix="pseudo-write")
        self.ready: queue.Queue = queue.Queue()
        self.lock, self.report = threading.Lock(), threading.Lock()
        self.preparing = 0
        self.failure: BaseException | None = None
        self.loop = threading.Thread(target=self._run, name="pseudo-device", daemon=True)
        self.loop.start()

    # ---------------------------------------------------------------------------- producer side
    def submit(self, *args) -> None:
        """Prepare and label one image (``args`` for ``prepare``); waits while ``window`` images are in flight."""
        self._raise_failure()
        self.room.acquire()
        self._raise_failure()
        with self.lock:
            self.preparing += 1
        self.readers.submit(self._prepare, args)

    def close(self) -> None:
        """Wait for every submitted image; raise the first failed write."""
        self.ready.put(_CLOSE)
        self.loop.join()
        self.readers.shutdown()
        self.writers.shutdown()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # ------------------------------------------------------------------------------ the threads
    def _prepare(self, args: tuple) -> None:
        item = None
        try:
            if self.failure is None:
                item = self.prepare(*args)
                if item.probs is not None:
                    item.probs, item.guide = self._host(item.probs), self._host(item.guide)
        except BaseException as e:  # prepare reports an image's own errors in its Item: this is ours
            self._fail(e)
        finally:
            self.ready.put(item)

    def _fail(self, e: BaseException) -> None:
        with self.lock:
            self.failure = self.failure or e

    def _host(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.require(a, requirements=["C", "W"]))  # a decoded image may be read-only
        return t.pin_memory() if self.pin else t

    def _run(self) -> None:
        try:
            self._batches()
        except BaseException as e:
            self._fail(e)
        finally:  # wake a producer waiting for room: it finds the failure
            self.room.release(self.window)

    def _batches(self) -> None:
        table, held, closing = None, {}, False
        while not (closing and self.preparing == 0 and not held):
            got = [self.ready.get()]
            while not self.ready.empty():
                got.append(self.ready.get_nowait())
            for item in got:
                if item is _CLOSE:
                    closing = True
                    continue
                with self.lock:
                    self.preparing -= 1
                if item is None:            # skipped after a failure
                    self.room.release()
                elif item.probs is None:   # labelled already, or failed
                    self._finish(item)
                else:
                    held.setdefault(item.probs.shape[0], []).append(item)
            if self.failure is not None:
                self.room.release(sum(len(items) for items in held.values()))
                held = {}
                continue
            flush = self.preparing == 0  # nothing more is coming soon: partial groups go too
            for labels in list(held):
                group = held[labels]
                while len(group) >= self.batch or (flush and group):
                    if table is None:
                        table = unary_table(self.device)
                    self._label([group.pop(0) for _ in range(min(self.batch, len(group)))], table)
                if not group:
                    del held[labels]

    def _label(self, items: list[Item], table: torch.Tensor) -> None:
        """One batch through the device; its labels to the writers."""
        try:
            flat = refine_batch([i.probs for i in items], [i.guide for i in items],
                                torch.from_numpy(np.stack([i.values for i in items])), self.params, self.conf,
                                self.confidence, table).cpu().numpy()
        except (RuntimeError, ValueError) as e:  # the batch fails, the run goes on
            for item in items:
                self._finish(Item(item.image_id, item.out, error=f"dense CRF failed: {type(e).__name__}: {e}"))
            return
        sizes = [i.probs.shape[1] * i.probs.shape[2] for i in items]
        for item, label in zip(items, np.split(flat, np.cumsum(sizes)[:-1])):
            self._finish(Item(item.image_id, item.out, label=label.reshape(item.guide.shape[:2])))

    def _finish(self, item: Item) -> None:
        if item.error is None:
            self.writers.submit(self._write, item)
            return
        Path(item.out).unlink(missing_ok=True)
        self._report(item.image_id, item.error)
        self.room.release()

    def _write(self, item: Item) -> None:
        try:
            if self.failure is None:
                self.write(item.out, item.label)
                self._report(item.image_id, None)
        except BaseException as e:
            self._fail(e)
        finally:
            self.room.release()

    def _report(self, image_id: str, error: str | None) -> None:
        with self.report:
            self.on_result(image_id, error)
