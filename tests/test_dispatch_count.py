"""The op/sync counter that the batching proxies rely on sees what a GPU would wait for."""
import torch

from dispatch_count import count


def test_counts_host_reads_and_data_dependent_shapes():
    x = torch.arange(12.0).reshape(3, 4) - 5
    c, _ = count(lambda: x.sum().item())
    assert (c.ops, c.syncs) == (2, 1)
    c, _ = count(lambda: x[x > 0])
    assert c.syncs == 1 and c.sync_ops["aten.index"] == 1
    c, _ = count(lambda: (x.nonzero(), x.tolist(), x.numpy(), x.cpu()))
    assert c.syncs == 4
    c, _ = count(lambda: torch.where(x > 0, x, 0.0).amax(dim=1))
    assert c.syncs == 0 and c.ops >= 3


def test_a_loop_over_the_batch_multiplies_the_ops():
    def per_image(batch):
        return torch.stack([b.softmax(0) * 2 for b in batch])

    one, _ = count(per_image, torch.randn(1, 5))
    eight, _ = count(per_image, torch.randn(8, 5))
    assert eight.ops >= 4 * one.ops
    batched1, _ = count(lambda b: b.softmax(1) * 2, torch.randn(1, 5))
    batched8, _ = count(lambda b: b.softmax(1) * 2, torch.randn(8, 5))
    assert batched8.ops == batched1.ops
