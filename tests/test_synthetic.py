"""The synthetic scenes' CAM error model: co-occurring classes traded."""
import numpy as np

from pipeline.data.synthetic import swap_cooccurring


def cams4():
    return np.stack([np.full((2, 3), v, np.float32) for v in (1.0, 2.0, 3.0, 4.0)])


def test_swap_trades_two_visible_classes_and_leaves_the_rest():
    cams = cams4()
    out = swap_cooccurring(cams, [True, False, True, False], np.random.default_rng(0), 1.0)
    assert out[:, 0, 0].tolist() == [3.0, 2.0, 1.0, 4.0]        # only the two visible ones trade places
    assert cams[:, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]       # the input is not modified
    three = [swap_cooccurring(cams, [True, True, True, False], np.random.default_rng(s), 1.0)[:, 0, 0].tolist()
             for s in range(30)]
    assert all(t[3] == 4.0 and sorted(t[:3]) == [1.0, 2.0, 3.0] and t[:3] != [1.0, 2.0, 3.0] for t in three)
    assert len({tuple(t) for t in three}) == 3                  # every pair of the three can be the one traded


def test_swap_probability_and_no_draw_when_it_cannot_swap():
    cams = cams4()
    rng = np.random.default_rng(7)
    swapped = sum(swap_cooccurring(cams, [True, True, False, False], rng, 0.3)[0, 0, 0] == 2.0 for _ in range(4000))
    assert abs(swapped / 4000 - 0.3) < 0.03
    for visible, p in (([True, True, True, True], 0.0), ([False, True, False, False], 1.0)):
        rng, ref = np.random.default_rng(3), np.random.default_rng(3)
        assert np.array_equal(swap_cooccurring(cams, visible, rng, p), cams)
        assert rng.random() == ref.random()                     # the caller's later draws are untouched
