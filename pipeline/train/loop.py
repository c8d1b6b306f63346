"""Training loop for the segmentation models on pseudo labels (or ground truth), single process or DDP.

    cfg = load_config("configs/weclip_voc.yaml", ["schedule.iters=1000", "data.root=~/data/VOC2012"])
    train(cfg, "outputs/voc/weclip", resume=True)

What it guarantees: the whole split is validated before the first step (names the bad files); the
data stream and every RNG are restored on ``resume`` so an interrupted run continues exactly (same
batches, same dropout masks, same optimiser state); checkpoints are written atomically; CSV (and
TensorBoard when installed) logs; periodic validation mIoU; bf16/fp16 autocast on CUDA; gradient
accumulation; DDP under ``torchrun`` (NCCL on GPUs, gloo on CPUs).

The steps live in their own modules: ``config`` (keys, overrides, the check), ``distributed`` (ranks,
devices), ``inputs`` (data, checks, the batch stream), ``step`` with ``step_offline`` / ``step_online``
(one optimiser step; labels from files or made online), ``state`` (checkpoints, resume), ``runlog``,
``validation``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..io import check_output_folder
from . import distributed, state
from .config import check_config
from .device import amp_dtype, peak_memory_mb, seed_all
from .inputs import check_inputs, fingerprints, open_inputs, training_batches
from .optim import build_optimizer, set_lr
from .runlog import RunLog
from .step import StepSettings, read_losses, train_step
from .validation import validate_run


def train(cfg: Mapping, out_dir: str | Path, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, tensorboard: bool = True, clip_model: nn.Module | None = None,
          label_maker=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns {iteration, loss, val_miou (0..1), checkpoint, seconds}.

    With ``online.method`` set, each batch's labels are made while training (``pipeline.train.online``) from
    the images' image-level labels; ``label_maker`` replaces the configured one (tests).

    ``stop_at``: save and return after this iteration (the schedule still spans ``schedule.iters``;
    ``resume=True`` continues). ``clip_model``: a CLIP module to use instead of ``model.clip`` (tests).
    """
    from tqdm import tqdm

    from ..models import build_model, trainable_parameters

    cfg = check_config(cfg)
    proc = distributed.start(cfg["train"]["device"])
    say = log if proc.rank == 0 else (lambda *_: None)
    out = check_output_folder(out_dir)
    t_cfg, s_cfg = cfg["train"], cfg["schedule"]
    seed = int(t_cfg["seed"])
    seed_all(seed + proc.rank)

    ds, step, val_samples = open_inputs(cfg, say)
    class_names = ["background", *ds.classes.names]
    check_inputs(step, val_samples, len(class_names), proc)
    inputs = fingerprints(cfg, step)

    clip_model = step.clip(clip_model)
    model = build_model(cfg["model"], len(class_names), clip=clip_model, log=say).to(proc.device)
    step.prepare(clip_model, ds.classes, label_maker)
    say(f"model {cfg['model']['name']}: {trainable_parameters(model):,} trainable parameters")
    optimizer = build_optimizer(model, cfg["optim"])
    dtype = amp_dtype(t_cfg["amp"], proc.device)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=dtype == torch.float16)
    meta = state.run_meta(cfg, model, class_names, inputs)
    ckdir = out / "checkpoints"
    start = state.restore(ckdir, cfg, inputs, class_names, model, optimizer, scaler, resume, proc, seed, say)
    state.begin(out, cfg, inputs, proc)
    if proc.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    batches = training_batches(step, cfg, start, proc)

    iters = int(s_cfg["iters"])
    end = min(iters, stop_at) if stop_at else iters
    settings = StepSettings.from_config(t_cfg, dtype)
    runlog = RunLog(out, start, tensorboard, say) if proc.rank == 0 else None
    bar = tqdm(total=iters, initial=start, disable=not progress or proc.rank != 0, dynamic_ncols=True, desc="train")
    last_loss, val_miou, ck_path, t0 = float("nan"), None, None, time.perf_counter()
    pending: list = []  # losses still on the device, read (and checked) at log, validation and checkpoint steps
    model.train()
    try:
        for it in range(start, end):
            set_lr(optimizer, it, s_cfg)
            pending.append((it + 1, train_step(model, optimizer, scaler, batches, step, it, settings, proc)))
            done, lr = it + 1, optimizer.param_groups[0]["lr"]
            bar.update(1)
            do_val = bool(val_samples) and t_cfg["val_every"] and (done % int(t_cfg["val_every"]) == 0 or done == iters)
            do_log = done % int(t_cfg["log_every"]) == 0 or do_val or done == end
            do_ckpt = done % int(t_cfg["ckpt_every"]) == 0 or done == end
            if do_log or do_ckpt:  # every process reads at the same steps: a non-finite loss stops them all
                losses = read_losses(pending)
                last_loss = losses[0]
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            if do_val:
                val_miou = validate_run(model, val_samples, cfg, proc, len(class_names), done, say)
            if runlog and do_log:
                runlog.record(done, losses, lr, val_miou if do_val else None, peak_memory_mb(proc.device),
                              settings.aff_weight != 0)
            if do_ckpt:
                ck_path = state.save(model, optimizer, scaler, meta, done, s_cfg, ckdir, int(t_cfg["keep_checkpoints"]),
                                     proc)
    finally:
        bar.close()
        if runlog:
            runlog.close()
    return {"iteration": end, "loss": last_loss, "val_miou": val_miou, "checkpoint": str(ck_path) if ck_path else None,
            "seconds": round(time.perf_counter() - t0, 3)}
