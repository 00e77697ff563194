"""bench/ensemble_spread.py's figures on two members' scores of three images, worked by hand."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ensemble_spread  # noqa: E402


def test_the_spread_of_two_members_over_three_images():
    s = ensemble_spread.spread(torch.tensor([[0.0, 2.0, 4.0], [1.0, 2.0, 5.0]]))
    # image means 0.5, 2, 4.5: their mean 7/3, their sample std sqrt(49/12)
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["mean_sd_across_images"] == pytest.approx((49 / 12) ** 0.5)
    # population variance within each image: 0.25, 0, 0.25; the worst below the mean: 0.5, 0, 0.5
    assert s["within_image_variance"] == pytest.approx(1 / 6)
    assert s["worst_below_mean"] == pytest.approx(1 / 3)
    # deviations (-2, 0, 2) and (-5/3, -2/3, 7/3): r = 8 / sqrt(8 x 78/9)
    assert s["pairwise_correlation"] == pytest.approx(8 / (8 * 78 / 9) ** 0.5)


def test_one_member_has_no_spread():
    with pytest.raises(ValueError, match="members >= 2"):
        ensemble_spread.spread(torch.tensor([[0.0, 1.0, 2.0]]))
