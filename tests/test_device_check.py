"""The device checker behind ``strict_device`` sees what CPU kernels let through."""
import pytest
import torch

from device_check import MixedDevices, one_device


def test_one_device_catches_what_cpu_kernels_let_through():
    cpu, meta = torch.randn(2, 3), torch.randn(3, 2, device="meta")
    assert (cpu @ meta).device.type == "cpu"                      # no error without the mode
    with one_device():
        with pytest.raises(MixedDevices):
            cpu @ meta
        with pytest.raises(MixedDevices):
            cpu.gather(1, torch.zeros(2, 1, dtype=torch.long, device="meta"))
        assert (cpu * torch.tensor(2.0)).shape == (2, 3)          # a 0-dim scalar may come from anywhere
        assert cpu.to("meta").device.type == "meta"               # copies cross devices


def test_strict_device_puts_new_tensors_on_meta_and_leaves_nothing_behind(strict_device):
    x = torch.randn(3)
    modes = torch._C._len_torch_function_stack()
    with strict_device():
        assert torch.zeros(3).device.type == "meta"
        assert torch.zeros(3, device=x.device).device == x.device
        with pytest.raises(MixedDevices):
            x @ torch.ones(3)
    assert torch.zeros(1).device.type == "cpu"
    assert torch._C._len_torch_function_stack() == modes      # no default-device mode left for later tests
