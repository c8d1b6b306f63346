"""Training speed and peak memory of each model at the reference settings, side by side.

    python -m benchmarks.train                      # CPU (or the GPU when one is visible)
    python -m benchmarks.train --iters 20 --device cuda --amp bf16
    python -m benchmarks.train --models weclip,weclip-online    # offline vs online labels, same model
    python -m benchmarks.train --models weclip-online,excel      # WeCLIP's and ExCEL's online training
    python -m benchmarks.train --models weclip-online,weclip-plus  # WeCLIP and WeCLIP+ (frozen DINOv2 added)

weclip-online: the same WeCLIP model and optimiser, but each step also makes its labels (GradCAM of
the crops' classes on the model's frozen pass, RFM in its second phase, PAR) and adds the affinity
loss; each image gets 2 random classes. excel: ExCEL's model (calibrated encoder over 12 blocks, 6.3M
trainable parameters) with its online labels in the costlier second phase (a second, dynamic encoder
pass for the CAMs, A_f-filtered RFM, PAR) and the diversity loss from the segmentation; lr 1e-4 x 10;
no text enrichment (it is set up once, outside the timed steps). weclip-plus: WeCLIP+'s model (random
ViT-B/16 CLIP and ViT-S/14 DINOv2, two fusion heads, shared decoder; 2.9M trainable parameters) with its
online labels (GradCAM, RFM+ with the segmentation weighting, PAR, the confident-pixel replacement on)
and its losses (balanced CE, Dice, affinity, cross-branch); lr 2e-5 x 10.

WeCLIP: random ViT-B/16 CLIP, batch 4, crop 320, AdamW (WeCLIP's settings). DeepLabV2: the model of
configs/deeplab_voc.yaml (deeplab-pytorch's MSC ResNet-101: forward and loss at scales 1, 0.5, 0.75 and
their max; random weights, BatchNorm frozen as with a pretrained file), batch 5, crop 321, SGD (one
micro-batch per step; iter_size 2 would double the time).
Each model runs in its own process so peak memory is its own: CPU = peak resident set size of that
process (weights + activations + allocator), GPU = torch.cuda.max_memory_allocated. Inputs are random
tensors (the data pipeline is not timed); the first ``--warmup`` iterations are not timed.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

SETTINGS = {"weclip": {"batch": 4, "crop": 320, "optim": {"name": "adamw", "lr": 2e-4, "head_lr_mult": 10,
                                                          "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}},
            "weclip-online": {"batch": 4, "crop": 320, "optim": {"name": "adamw", "lr": 2e-4, "head_lr_mult": 10,
                                                                 "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}},
            "weclip-plus": {"batch": 4, "crop": 320, "optim": {"name": "adamw", "lr": 2e-5, "head_lr_mult": 10,
                                                               "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}},
            "excel": {"batch": 4, "crop": 320, "optim": {"name": "adamw", "lr": 1e-4, "head_lr_mult": 10,
                                                         "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}},
            "deeplabv2": {"batch": 5, "crop": 321, "optim": {"name": "sgd", "lr": 2.5e-4, "head_lr_mult": 10,
                                                             "weight_decay": 5e-4, "momentum": 0.9}}}


class Rows(list):
    """A list that ``bench_one`` can report to in place of a process queue."""

    def put(self, item) -> None:
        self.append(item)


def bench_one(name: str, iters: int, warmup: int, device: str, amp: str, queue, quick: bool = False) -> None:
    """One model's steps; puts its row on ``queue``. ``quick``: a tiny CLIP / ResNet, batch 2, crop 32."""
    import torch

    from pipeline.models import build_model, trainable_parameters
    from pipeline.train.config import load_config
    from pipeline.train.device import amp_dtype, autocast
    from pipeline.train.losses import affinity_labels, affinity_loss, model_loss, segmentation_loss
    from pipeline.train.optim import build_optimizer

    s = dict(SETTINGS[name], **({"batch": 2, "crop": 32} if quick else {}))
    arch = "TINY" if quick else "VIT_B_16"
    dev = torch.device(device)
    torch.manual_seed(0)
    maker = None
    if name == "weclip-plus":
        from pipeline.classes import builtin
        from pipeline.clip import random as rnd
        from pipeline.dino import random as dino_rnd
        from pipeline.train.online import OnlineBatch, build_label_maker

        clip = rnd.random_clip(getattr(rnd, arch), seed=0)
        dino = dino_rnd.random_dino(dino_rnd.TINY if quick else dino_rnd.VIT_S_14, seed=0)
        model = build_model({"name": "weclip-plus"}, 21, clip=clip, dino=dino)
        maker = build_label_maker({"method": "weclip-plus", "cam_input_block": None if quick else 10, "replace_from": 0}, clip,
                                  builtin("voc"))
    elif name.startswith("weclip"):
        from pipeline.clip import random as rnd

        clip = rnd.random_clip(getattr(rnd, arch), seed=0)
        model = build_model({"name": "weclip"}, 21, clip=clip)
        if name == "weclip-online":
            from pipeline.classes import builtin
            from pipeline.train.online import OnlineBatch, build_label_maker

            maker = build_label_maker({"method": "weclip", "switch_iter": 0}, clip, builtin("voc"))
    elif name == "excel":
        from pipeline.classes import builtin
        from pipeline.train.online import OnlineBatch, build_label_maker
        from pipeline.clip import random as rnd

        clip = rnd.random_clip(getattr(rnd, arch), seed=0)
        model = build_model({"name": "excel"}, 21, clip=clip)
        maker = build_label_maker({"method": "excel", "switch_iter": 0, "segmentation_targets_from": 0,
                                   "tse": False}, clip, builtin("voc"), model_cfg={"name": "excel"}, dataset="voc")
    else:
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "deeplab_voc.yaml")["model"]
        if quick:
            cfg = {**cfg, "layers": [1, 1, 1, 1], "base_width": 8}
        model = build_model({**cfg, "name": name, "freeze_bn": True}, 21, log=lambda *_: None)
    model = model.to(dev).train()
    opt = build_optimizer(model, s["optim"])
    dtype = amp_dtype(amp, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    x = torch.randn(s["batch"], 3, s["crop"], s["crop"], device=dev)
    y = torch.randint(0, 21, (s["batch"], s["crop"], s["crop"]), device=dev)
    y[:, :40] = 255
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(warmup + iters):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        with autocast(dev, dtype):
            if maker is None:
                logits = model(x)
            else:
                out = model(x, outputs="train", attention_blocks=maker.attention_blocks)
                batch = OnlineBatch(x, [[b % 20, (b + 7) % 20] for b in range(len(x))], [(b, b) for b in range(len(x))])
                made = maker(batch, out, i)
                labels = made.labels
                pairs = labels if made.affinity_targets is None else made.affinity_targets
        if maker is None:
            loss = model_loss(model, logits, y)
        else:
            loss = segmentation_loss(out["logits"], labels, "bgfg") + \
                0.1 * affinity_loss(out["affinity"], affinity_labels(pairs, out["grid"], 8))
            if hasattr(maker, "extra_loss"):
                loss = loss + maker.extra_loss(out, made)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        kind = "peak RSS"
    queue.put({"model": name + ("-msc" if getattr(model, "msc_scales", ()) else ""), "trainable_params": trainable_parameters(model), "batch": s["batch"], "crop": s["crop"],
               "device": str(dev), "amp": str(dtype).replace("torch.", "") if dtype else "none",
               "threads": torch.get_num_threads(), "iters_timed": len(times),
               "s_per_iter": round(sum(times) / len(times), 3), "iters_per_s": round(len(times) / sum(times), 4),
               "peak_mem_mb": round(peak, 1), "memory": kind})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="weclip,weclip-online,weclip-plus,excel,deeplabv2")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny models, one timed iteration: checks the code only")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 1, 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    rows = Rows()
    for name in args.models.split(","):
        if args.quick:  # in this process: no start-up per model (its memory figure is then not its own)
            bench_one(name, args.iters, args.warmup, device, args.amp, rows, quick=True)
            continue
        q = ctx.Queue()
        proc = ctx.Process(target=bench_one, args=(name, args.iters, args.warmup, device, args.amp, q, args.quick))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{name}: benchmark process failed (exit {proc.exitcode})", file=sys.stderr)
            return 1
        rows.append(q.get())
    from pipeline.eval.metrics import format_table

    print(format_table(rows, ["model", "trainable_params", "batch", "crop", "device", "amp", "threads",
                              "iters_timed", "s_per_iter", "iters_per_s", "peak_mem_mb", "memory"]))
    if args.json:
        from pipeline.io import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
