"""Failures that only a machine with CUDA shows, reproduced on the CPU by making torch report GPUs: a torchrun
process told to compute on the CPU there must still join a process group that works on the CPU; a checkpoint
saved on a machine with more GPUs must resume."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


class Joined(Exception):
    """Raised by the stand-in ``init_process_group`` with the backend it was asked for."""


@pytest.fixture
def gpu_machine_torchrun(monkeypatch):
    """Rank 0 of 2 under torchrun, on a machine whose torch reports a GPU; joining the group raises ``Joined``."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def join(backend, *args, **kwargs):
        raise Joined(backend)

    monkeypatch.setattr(dist, "init_process_group", join)


def test_training_on_the_cpu_of_a_gpu_machine_joins_gloo(gpu_machine_torchrun):
    from pipeline.train import distributed

    with pytest.raises(Joined) as joined:
        distributed.start("cpu")
    assert str(joined.value) == "gloo"  # NCCL cannot all-reduce the CPU process's tensors


def test_cams_on_the_cpu_of_a_gpu_machine_join_gloo(gpu_machine_torchrun, tmp_path):
    from pipeline.cams.stage import CamsConfig, run_cams

    cfg = CamsConfig(dataset="voc", root=str(tmp_path), split="train", clip=str(tmp_path / "clip.pt"),
                     out=str(tmp_path / "out"), device="cpu")
    with pytest.raises(Joined) as joined:
        run_cams(cfg)
    assert str(joined.value) == "gloo"  # NCCL has no barrier on the CPU


def test_resuming_on_a_machine_with_fewer_gpus_restores_the_ones_it_has(monkeypatch):
    from pipeline import checkpoint

    state = checkpoint.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # saved with 2 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    checkpoint.set_rng_state(state)
    assert len(restored) == 1 and restored[0].eq(0).all()  # torch would fail on the absent second GPU
