"""Boundary distances (`unet_dist/surface.py`) against their definitions computed point by point."""

import numpy as np
import pytest

from unet_dist.data.convert import IGNORE
from unet_dist.surface import boundary_row, boundary_rows, boundary_scores, per_class


def _outline_points(mask):
    """The pixels of `mask` with a 4-neighbour outside it or past the edge, by their neighbours."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~inner).astype(float)


def _reference(pred, truth, c, tolerance):
    """HD95, ASSD and NSD from every pair of outline points (no distance transform, no crop)."""
    t, p = truth == c, (pred == c) & (truth != IGNORE)
    et, ep = _outline_points(t), _outline_points(p)
    d = np.sqrt(((ep[:, None] - et[None]) ** 2).sum(-1))
    d_pt, d_tp = d.min(axis=1), d.min(axis=0)
    both = np.concatenate([d_pt, d_tp])
    return [max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), both.mean(), np.mean(both <= tolerance)]


def _blobs(rng, shape, n):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.uint8)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 9)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 3)
    return out


def test_distances_equal_their_definitions_point_by_point():
    # Random blobs of two classes, some cut by the image's edge, some with ignored pixels: the
    # cropped distance transforms give what every pair of outline points gives.
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(30):
        truth, pred = _blobs(rng, (48, 64), 6), _blobs(rng, (48, 64), 6)
        if i % 3 == 0:
            truth[rng.random(truth.shape) < 0.05] = IGNORE
        for c in (1, 2):
            row = boundary_row(pred, truth, c, tolerance=1.5)
            has_t, has_p = (truth == c).any(), ((pred == c) & (truth != IGNORE)).any()
            assert row[:2].tolist() == [has_t, has_p]
            if has_t and has_p:
                assert row[2:].tolist() == pytest.approx(_reference(pred, truth, c, 1.5), abs=1e-12)
                checked += 1
            else:
                assert not row[2:].any()
    assert checked > 40


def test_a_shifted_outline_a_far_speck_and_an_ignored_band():
    truth = np.zeros((64, 64), np.uint8)
    truth[10:30, 10:30] = 1
    assert boundary_row(truth, truth, 1).tolist() == [1, 1, 0, 0, 1]
    # Moved 3 pixels right: no outline pixel is further than 3 from the other; the vertical sides
    # are 3 off, so NSD at 2 px counts only the horizontal ones that still meet.
    shifted = np.roll(truth, 3, axis=1)
    hd95, assd, nsd = boundary_row(shifted, truth, 1, tolerance=2)[2:]
    assert hd95 == 3 and 0 < assd < 3 and 0.3 < nsd < 0.7
    assert boundary_row(shifted, truth, 1, tolerance=3)[4] == 1
    # A 3x3 speck 40 pixels away: IoU 0.98, and the HD95 of the prediction's side sees it (its 8
    # outline pixels are over 5% of the 84); a 2x2 one (4 of 80) is at the percentile's edge.
    speck = truth.copy()
    speck[58:61, 58:61] = 1
    assert boundary_row(speck, truth, 1)[2] > 38
    far = sum(np.hypot(y - 29, x - 29) for y in range(58, 61) for x in range(58, 61) if (y, x) != (59, 59))
    assert boundary_row(speck, truth, 1)[3] == pytest.approx(far / (84 + 76))  # the square's outlines agree
    # The Pet trimaps' border band left out (IGNORE): a prediction whose edge lies anywhere in it
    # scores as the truth's own outline.
    banded = truth.copy()
    banded[7:33, 7:33][banded[7:33, 7:33] == 0] = IGNORE
    wider = np.zeros_like(truth)
    wider[8:32, 9:31] = 1
    assert boundary_row(wider, banded, 1).tolist() == [1, 1, 0, 0, 1]


def test_images_missing_a_class_count_as_missed_or_spurious_and_the_scores_average_images():
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 4:12] = 1
    shifted = np.roll(truth, 2, axis=0)
    empty = np.zeros_like(truth)
    rows = np.stack([boundary_rows(truth, truth, 3), boundary_rows(shifted, truth, 3),
                     boundary_rows(empty, truth, 3), boundary_rows(truth, empty, 3), boundary_rows(empty, empty, 3)])
    (scores,) = boundary_scores(rows)  # class 2 is in no mask: no row
    second = rows[1, 1]
    assert scores == {"class": 1, "images": 2, "hd95": pytest.approx(second[2] / 2),
                      "hd95_median": pytest.approx(second[2] / 2), "assd": pytest.approx(second[3] / 2),
                      "nsd": pytest.approx((1 + second[4]) / 4), "nsd_tolerance": 2.0, "missed": 1, "spurious": 1}
    assert per_class(rows[2]) == {"hd95_per_class": [None, None, None], "assd_per_class": [None, None, None],
                                  "nsd_per_class": [None, 0.0, None]}
    assert per_class(rows[0])["hd95_per_class"] == [None, 0.0, None]
