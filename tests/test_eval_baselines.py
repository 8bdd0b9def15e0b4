"""Resolution-enhancement baselines and their scores (spfm.eval.baselines)."""

import numpy as np
import pytest

from spfm.eval.baselines import enhancement_scores, parent_copy, spatial_linear


def _grid(side: int = 6):
    """Spots on a unit grid, four subspots each at +-0.25; a linear field a x + b y per subspot."""
    sx, sy = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float))
    spot_xy = np.stack([sx.ravel(), sy.ravel()], 1)
    offsets = np.array([[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25]])
    sub_xy = (spot_xy[:, None, :] + offsets[None]).reshape(-1, 2)
    parent = np.repeat(np.arange(len(spot_xy)), 4)
    truth = np.stack([sub_xy[:, 0] + 2 * sub_xy[:, 1], 3 * sub_xy[:, 0] - sub_xy[:, 1]], 1) + 10.0
    spots = np.zeros((len(spot_xy), 2))
    np.add.at(spots, parent, truth)  # counts-like: a spot is the sum of its subspots
    return spots, spot_xy, sub_xy, parent, truth


def test_parent_copy_and_linear_interpolation_on_a_linear_field():
    spots, spot_xy, sub_xy, parent, truth = _grid()
    copy = parent_copy(spots, parent, "sum")
    np.testing.assert_allclose(copy[:4], np.repeat(truth[:4].mean(0, keepdims=True), 4, 0))
    lin = spatial_linear(spots, spot_xy, sub_xy, parent, "sum")
    inside = (sub_xy.min(1) >= 0) & (sub_xy.max(1) <= 5)  # within the spots' convex hull
    np.testing.assert_allclose(lin[inside], truth[inside], atol=1e-9)  # a linear field is interpolated exactly


def test_scores_and_within_spot_pearson():
    spots, spot_xy, sub_xy, parent, truth = _grid()
    perfect = enhancement_scores(truth, truth, parent)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["mse_minmax"] == pytest.approx(0.0)
    assert perfect["within_spot_pearson"] == pytest.approx(1.0)
    copy = enhancement_scores(parent_copy(spots, parent, "sum"), truth, parent)
    assert 0.9 < copy["pearson"] < 1.0 and np.isnan(copy["within_spot_pearson"])  # the copy adds nothing inside spots
    flipped = 2 * parent_copy(spots, parent, "sum") - truth  # deviations with the wrong sign
    assert enhancement_scores(flipped, truth, parent)["within_spot_pearson"] == pytest.approx(-1.0)
    assert "within_spot_pearson" not in enhancement_scores(truth, truth)
    with pytest.raises(ValueError, match="one entry per subspot"):
        enhancement_scores(truth, truth, parent[:-1])
