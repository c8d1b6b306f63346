"""A run's state in its checkpoints: what a checkpoint records, saving it from every process (each
one's RNG states), and restoring it on ``--resume`` so that the run continues exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .. import checkpoint as ckpt_io
from ..io import code_version, write_json
from .config import ConfigError, resume_differences
from .device import seed_all
from .distributed import Process
from .inputs import fingerprint_differences


def run_meta(cfg: Mapping[str, Any], model: nn.Module, class_names: list[str], inputs: Mapping[str, Any]
             ) -> dict[str, Any]:
    """The checkpoint meta that inference reads (``pipeline.checkpoint``); ``inputs``: the run's
    ``inputs.fingerprints``."""
    return {"model": cfg["model"], "family": getattr(model, "family", cfg["model"]["name"]),
            "num_classes": len(class_names), "class_names": class_names, "normalize": cfg["data"]["normalize"],
            "infer": cfg["infer"], "config": cfg, "inputs": dict(inputs)}


def restore(ckdir: Path, cfg: Mapping[str, Any], inputs: Mapping[str, Any], class_names: list[str],
            model: nn.Module, optimizer, scaler, resume: bool, proc: Process, seed: int,
            say: Callable[[str], None]) -> int:
    """Load the newest checkpoint of ``ckdir`` (``checkpoint.newest``) into the model, optimiser, scaler
    and RNGs when ``resume``; returns the iteration to start from. Refuses a checkpoint of another model,
    class list, configuration or ``inputs`` (fingerprints compared by content), and (without ``resume``)
    a folder that already holds a run."""
    out = ckdir.parent
    found = ckpt_io.newest(ckdir) if ckdir.is_dir() else None
    if resume and found is not None:
        ck = ckpt_io.load(found)
        ckpt_io.check_compatible(ck, cfg["model"]["name"], class_names)
        diff = resume_differences(ck["meta"]["config"], cfg)
        if diff:
            raise ConfigError(f"{ck['path']}: cannot resume with a different configuration (differs in: "
                              f"{', '.join(diff)}); use another output folder")
        if "inputs" in ck["meta"]:
            changed = fingerprint_differences(ck["meta"]["inputs"], inputs, cfg)
            if changed:
                raise ConfigError(f"{ck['path']}: cannot resume with other inputs: {'; '.join(changed)}; give the "
                                  "run's own, or use another output folder")
        else:
            say(f"resume: {ck['path']} records no input fingerprints (saved before they were recorded): the CLIP "
                "file and the pseudo labels are not compared")
        ckpt_io.load_model_state(model, ck["model"], ck["path"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start = int(ck["iteration"])
        rngs = ck["rng"]
        if len(rngs) == proc.world:
            ckpt_io.set_rng_state(rngs[proc.rank])
        else:
            say(f"resume: checkpoint saved by {len(rngs)} process(es), now {proc.world}: RNGs re-seeded")
            seed_all(seed + proc.rank + start)
        say(f"resumed from {ck['path']} at iteration {start}")
        return start
    if resume:
        say(f"--resume: {out} holds no checkpoint yet (checkpoints/{ckpt_io.LATEST}); starting a new run there")
    elif found is not None:
        raise ConfigError(f"{out} already holds a run (checkpoints/{found.name}); pass --resume to continue "
                          "it, or choose another output folder")
    return 0


def begin(out: Path, cfg: Mapping[str, Any], inputs: Mapping[str, Any], proc: Process) -> None:
    """Rank 0, once the run may go on: the temp files of writes a kill interrupted go, ``config.json``
    records the config and the inputs' fingerprints."""
    if proc.rank == 0:
        for folder in (out, out / "checkpoints"):
            ckpt_io.remove_temporaries(folder)
        write_json(out / "config.json", {"config": cfg, "inputs": dict(inputs), "code_version": code_version(),
                                         "world_size": proc.world})


def save(model: nn.Module, optimizer, scaler, meta: Mapping[str, Any], step: int, schedule: Mapping, ckdir: Path,
         keep: int, proc: Process) -> Path | None:
    """All ranks send their RNG states to rank 0, which writes the checkpoint and then the pointer."""
    rngs = proc.gather(ckpt_io.rng_state())
    path = None
    if proc.rank == 0:
        path = ckpt_io.save(ckdir / f"iter_{step:07d}.pt", {
            "meta": meta, "iteration": step, "model": ckpt_io.model_state(model),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"iteration": step, **dict(schedule)}, "rng": rngs})
        ckpt_io.write_latest(ckdir, path.name, step)
        ckpt_io.prune(ckdir, keep)
    proc.barrier()
    return path
