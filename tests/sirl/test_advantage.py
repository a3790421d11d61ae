import math

import pytest
import torch

from sirl.advantage import group_advantages


def test_group_zscore_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    adv, gstd = group_advantages(r, 4)
    s1 = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 3 ** 2) / 3)  # unbiased std of group 1 (mean 3)
    s2 = math.sqrt((3 * 1 ** 2 + 3 ** 2) / 3)  # group 2: mean 1
    expected = [-2 / s1, -1 / s1, 0.0, 3 / s1, -1 / s2, -1 / s2, -1 / s2, 3 / s2]
    torch.testing.assert_close(adv, torch.tensor(expected))
    torch.testing.assert_close(gstd, torch.tensor([s1, s2]))


def test_equal_rewards_give_zero_not_nan():
    adv, gstd = group_advantages(torch.full((4,), -2.5), 4, min_std=1e-4)
    assert torch.equal(adv, torch.zeros(4)) and gstd.item() == 0.0


def test_batch_and_none_scaling():
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    adv, _ = group_advantages(r, 2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    adv, _ = group_advantages(r, 2, scale="batch")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / r.std())
    adv, _ = group_advantages(r, 2, scale="batch", batch_std=4.0)
    torch.testing.assert_close(adv, torch.tensor([-0.25, 0.25, -0.5, 0.5]))


def test_min_std_floor():
    adv, _ = group_advantages(torch.tensor([0.0, 1e-6]), 2, min_std=1e-2)
    torch.testing.assert_close(adv, torch.tensor([-0.5e-6, 0.5e-6]) / 1e-2)


def test_invalid_rows_are_left_out():
    r = torch.tensor([1.0, 3.0, 100.0, 5.0])
    valid = torch.tensor([True, True, False, True])
    adv, _ = group_advantages(r, 4, valid=valid)
    s = math.sqrt((4 + 0 + 4) / 2)  # 1, 3, 5: mean 3
    torch.testing.assert_close(adv, torch.tensor([-2 / s, 0.0, 0.0, 2 / s]))


def test_shape_errors():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 4)
