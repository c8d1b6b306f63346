"""A training run's log: ``log.csv`` and, when installed, TensorBoard."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..io import write_bytes


class RunLog:
    """CSV log (rewritten on resume up to the resume point) plus TensorBoard when installed."""

    FIELDS = ("iteration", "loss", "lr", "seconds", "iters_per_s", "peak_mem_mb", "val_miou_pct", "loss_seg", "loss_aff")

    def __init__(self, out: Path, start: int, tensorboard: bool, log: Callable[[str], None]):
        self.t0 = self.t_last = time.perf_counter()
        self.it_last = start
        self.path = out / "log.csv"
        rows = []
        if start > 0 and self.path.is_file():
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["iteration"]) <= start]
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_bytes(self.path, buf.getvalue().encode())
        self.file = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.file, self.FIELDS, lineterminator="\n", extrasaction="ignore")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
            except ImportError:
                log("TensorBoard is not installed (pip install tensorboard): logging to log.csv only")

    def record(self, step: int, losses: tuple[float, float, float], lr: float, val_miou: float | None,
               peak_mem_mb: float | None, affinity: bool) -> None:
        """A row for iteration ``step``: losses (total, segmentation, affinity; the last only when
        ``affinity``), validation mIoU (0..1) or None, and the speed since the previous row."""
        now = time.perf_counter()
        loss, seg, aff = losses
        self.write({"iteration": step, "loss": round(loss, 6), "lr": lr, "seconds": round(now - self.t0, 3),
                    "iters_per_s": round((step - self.it_last) / max(now - self.t_last, 1e-9), 4),
                    "peak_mem_mb": peak_mem_mb, "val_miou_pct": None if val_miou is None else round(100 * val_miou, 4),
                    "loss_seg": round(seg, 6), "loss_aff": round(aff, 6) if affinity else None})
        self.t_last, self.it_last = now, step

    def write(self, row: Mapping[str, Any]) -> None:
        self.csv.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.FIELDS})
        self.file.flush()
        if self.tb:
            for k in ("loss", "lr", "iters_per_s", "peak_mem_mb", "val_miou_pct", "loss_seg", "loss_aff"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}" if k != "val_miou_pct" else "val/miou_pct", row[k], row["iteration"])

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
