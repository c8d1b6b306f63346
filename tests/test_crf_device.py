"""The torch dense CRF as a GPU runs it, checked on the CPU: every tensor follows the inputs' device
(``strict_device``), batching multiplies neither the operations nor the host reads (``dispatch_count``),
images of different sizes batch together with the same results, and the sparse-matrix filter adds in
pydensecrf's order."""
import numpy as np
import pytest
import torch

from dispatch_count import count
from pipeline.labels import crf
from pipeline.labels.crf import permutohedral, torch_backend

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(batch, labels, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, labels, height, width, generator=g) * 5,
            torch.randint(0, 256, (batch, height, width, 3), generator=g, dtype=torch.uint8))


def test_every_tensor_follows_the_inputs_device(strict_device):
    u, g = inputs(2, 3, 12, 16)
    p = crf.CRFParams(iters=2)
    want = torch_backend.dense_crf(u, g, p)
    want2 = torch_backend.dense_crf(u[:, :2], g, p)  # 1-2 labels take the other slice
    with strict_device():
        got = torch_backend.dense_crf(u, g, p)
        got2 = torch_backend.dense_crf(u[:, :2], g, p)
        mixed = torch_backend.dense_crf_images([u[0], u[1, :, :8]], [g[0], g[1, :8]], p)
        numpy_q = crf.dense_crf(u[0].reshape(3, -1).numpy(), g[0].numpy(), p, backend="torch")
    assert got.device.type == "cpu" and torch.equal(got, want) and torch.equal(got2, want2)
    assert torch.equal(mixed[0], want[0]) and np.array_equal(numpy_q, want[0].numpy())


def test_batching_multiplies_neither_operations_nor_host_reads():
    p = crf.CRFParams(iters=2)
    one, _ = count(torch_backend.dense_crf, *inputs(1, 4, 24, 32), p)
    eight, _ = count(torch_backend.dense_crf, *inputs(8, 4, 24, 32), p)
    assert eight.ops <= 1.3 * one.ops, (one.ops, eight.ops)
    assert eight.syncs == one.syncs, (one.sync_ops, eight.sync_ops)
    # the host reads are the lattice builds' and the finite check, none per iteration
    longer, _ = count(torch_backend.dense_crf, *inputs(8, 4, 24, 32), crf.CRFParams(iters=5))
    assert longer.syncs == eight.syncs and longer.ops < eight.ops + 3 * 30


def test_images_of_different_sizes_batch_together_with_the_same_results():
    p = crf.PRESETS["weclip"].params
    a, ga = inputs(1, 3, 20, 28, seed=1)
    b, gb = inputs(1, 3, 31, 17, seed=2)
    qa, qb = torch_backend.dense_crf_images([a[0], b[0]], [ga[0], gb[0]], p)
    assert torch.equal(qa, torch_backend.dense_crf(a, ga, p)[0]) and torch.equal(qb, torch_backend.dense_crf(b, gb, p)[0])
    same, gs = inputs(3, 5, 16, 16, seed=3)
    batch = torch_backend.dense_crf(same, gs, p)
    assert all(torch.equal(batch[i], torch_backend.dense_crf(same[i:i + 1], gs[i:i + 1], p)[0]) for i in range(3))
    with pytest.raises(ValueError, match="one C"):
        torch_backend.dense_crf_images([a[0], b[0, :2]], [ga[0], gb[0]], p)
    with pytest.raises(ValueError, match="match its unary"):
        torch_backend.dense_crf_images([a[0]], [gb[0]], p)


def reference_steps(lat: permutohedral.Lattice, v: torch.Tensor):
    """pydensecrf's filter loops written out, step by step: splat w v point by point (each product rounded,
    then added in point order), blur new = old + (n1 + n2) / 2 along each direction, slice adding (w alpha) v
    per vertex for 3+ channels, (w v) alpha for 1-2. Returns (splat table, a function blurring along
    direction j, a function slicing a table)."""
    P, C = v.shape
    d1 = lat.offsets.shape[1]
    w = lat.weights.to(v.dtype)
    off = lat.offsets.long()
    table = v.new_zeros(lat.vertices + 1, C)
    table.index_add_(0, off.reshape(-1), (w[:, :, None] * v[:, None, :]).reshape(-1, C))

    def blur(t, j):
        return (t[lat.blur[j, 0].long()] + t[lat.blur[j, 1].long()]) * 0.5 + t

    def slice_(t):
        alpha = torch.tensor(1 / (1 + 2.0 ** -(d1 - 1)), dtype=torch.float32).to(v.dtype)
        out = v.new_zeros(P, C)
        for j in range(d1):
            out += (w[:, j:j + 1] * alpha) * t[off[:, j]] if C > 2 else (w[:, j:j + 1] * t[off[:, j]]) * alpha
        return out

    return table, blur, slice_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_filter_adds_in_pydensecrfs_order(dtype):
    """Splat and blur add in pydensecrf's order, bit for bit. The splat is checked on values that are powers
    of two, whose products with the weights are exact: a CPU sparse kernel that fuses multiply and add
    (MKL's on AVX-512) rounds each product once instead of twice, an ulp that is no question of order.
    For the same reason the slice (weights times arbitrary table values) agrees to an ulp or two."""
    rng = np.random.default_rng(4)
    lat = permutohedral.build(torch.tensor(rng.uniform(0, 12, (700, 5)), dtype=torch.float32))
    eps = torch.finfo(dtype).eps
    for channels in (1, 2, 3, 6):
        op = lat.operator(dtype, channels)
        v = torch.tensor(2.0 ** -rng.integers(0, 12, (700, channels)), dtype=dtype)
        table, blur, slice_ = reference_steps(lat, v)
        assert torch.equal(op.splat @ v, table), channels
        for j, step in enumerate(op.blur):
            assert torch.equal(step @ table, blur(table, j)), (channels, j)
            table = blur(table, j)
        torch.testing.assert_close(op.filter(v), slice_(table), rtol=4 * eps, atol=0)


def test_half_precision_iterates_in_half_with_float32_sparse_products():
    u, g = inputs(2, 4, 20, 24, seed=6)
    p = crf.CRFParams(iters=3)
    half = torch_backend.dense_crf(u.half(), g, p)
    full = torch_backend.dense_crf(u.half().float(), g, p)
    assert half.dtype == torch.float16
    assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.99 and (half.float() - full).abs().max() < 1e-2


def batch_inputs(sizes, labels, seed=0):
    """float16 probabilities (checked), guides and label values of synthetic scenes, as the pseudo stage
    prepares them, and the scenes themselves."""
    from pipeline.data import synthetic
    from pipeline.data.camfile import upsample_cams

    scenes, probs, guides, values = [], [], [], []
    for i, size in enumerate(sizes):
        img, keys, cams = synthetic.scene_with_cams(np.random.default_rng(seed + i), size, labels)
        cams = upsample_cams(cams, size)
        scenes.append((img, keys, cams))
        probs.append(torch.from_numpy(crf.background_probs(cams)))
        guides.append(torch.from_numpy(crf.wrapped_guide(img)))
        values.append(torch.from_numpy(crf.keys_ext(keys)))
    return scenes, probs, guides, torch.stack(values)


def test_half_unary_is_numpys_float16_arithmetic():
    from pipeline.labels.crf.batch import half_unary, unary_table

    p = np.random.default_rng(5).uniform(0, 1.2, (3, 7, 9)).astype(np.float16)
    p[0, 0, :4] = [0, -0.0, 1, 1e-7]
    got = half_unary(torch.from_numpy(p), unary_table("cpu"))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().reshape(3, -1), crf.unary_energy(p))


@pytest.mark.parametrize("confidence,power", [("crf", 1.0), ("raw", 2.0), ("none", 1.0)])
def test_refine_batch_equals_refine_image_by_image(confidence, power):
    from pipeline.labels.crf.batch import refine_batch, unary_table

    sizes = [(30, 40), (27, 35), (30, 40)]
    scenes, _, guides, values = batch_inputs(sizes, 2, seed=7)
    probs = [torch.from_numpy(crf.background_probs(cams, power)) for _, _, cams in scenes]
    flat = refine_batch(probs, guides, values, crf.CRFParams(), 0.9, confidence, unary_table("cpu"))
    got = np.split(flat.numpy(), np.cumsum([h * w for h, w in sizes])[:-1])
    for (img, keys, cams), label in zip(scenes, got):
        want = crf.refine(img, keys, cams, conf=0.9, confidence=confidence, power=power, backend="torch")
        assert np.array_equal(label.reshape(want.shape), want)


def test_refine_batch_follows_the_inputs_device(strict_device):
    from pipeline.labels.crf.batch import refine_batch, unary_table

    _, probs, guides, values = batch_inputs([(12, 16), (10, 14)], 3, seed=9)
    p = crf.CRFParams(iters=2)
    want = refine_batch(probs, guides, values, p, 0.95, "raw", unary_table("cpu"))
    with strict_device():
        got = refine_batch(probs, guides, values, p, 0.95, "raw", unary_table("cpu"))
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_inference_crf_path_follows_the_inputs_device(strict_device):
    """``eval.infer``'s CRF on model probabilities (float32), whole and through the resolution cap."""
    from pipeline.eval.infer import crf_refine

    (img, _, cams), = batch_inputs([(40, 60)], 3, seed=11)[0]
    probs = crf.background_probs(cams.astype(np.float32))
    p, guide = crf.PRESETS["weclip"].params, crf.PRESETS["weclip"].guide
    want = [crf_refine(img, probs, p, guide, "torch", "cpu", cap) for cap in (None, 1200)]
    with strict_device():
        got = [crf_refine(img, probs, p, guide, "torch", "cpu", cap) for cap in (None, 1200)]
    assert got[1].shape[1:] == crf.capped_size(40, 60, 1200)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
