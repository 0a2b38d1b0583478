"""Aggregations by hand on a padded 2x3 example (DESIGN.md section 2)."""
import math

import pytest
import torch

from seqrl.algorithms import AGGREGATIONS, agg_loss

# l_it with the padded slot holding garbage; |y_0| = 3, |y_1| = 2
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])

HAND = {
    "token-mean": (1 + 2 + 3 + 4 + 5) / 5,  # 3.0
    "seq-mean-token-mean": (6 / 3 + 9 / 2) / 2,  # 3.25
    "seq-mean-token-sum": (6 + 9) / 2,  # 7.5
    "seq-mean-token-sum-norm": (6 + 9) / 4 / 2,  # C = 4: 1.875
}


@pytest.mark.parametrize("agg", sorted(HAND))
def test_by_hand(agg):
    assert agg_loss(LOSS, MASK, agg, norm_const=4.0).item() == pytest.approx(HAND[agg])


def test_registry_holds_exactly_the_four_standard_names():
    assert set(AGGREGATIONS) == set(HAND)


def test_norm_const_defaults_to_longest_response():
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx((6 + 9) / 3 / 2)


@pytest.mark.parametrize("agg", sorted(HAND))
def test_padding_columns_and_empty_rows_change_nothing(agg):
    garbage = torch.tensor([[math.nan, math.inf], [-1e9, math.nan]])
    loss = torch.cat([LOSS, garbage], 1)  # (2, 5)
    mask = torch.cat([MASK, torch.zeros(2, 2, dtype=MASK.dtype)], 1)
    loss = torch.cat([loss, torch.full((1, 5), 7.0)])  # an all-masked third row (e.g. overlong-filtered)
    mask = torch.cat([mask, torch.zeros(1, 5, dtype=mask.dtype)])
    assert agg_loss(loss, mask, agg).item() == pytest.approx(agg_loss(LOSS, MASK, agg).item())


def test_token_weights_in_the_gradient():
    loss = LOSS.clone().requires_grad_()
    agg_loss(loss, MASK, "token-mean").backward()
    assert torch.allclose(loss.grad, MASK / 5.0)
    loss.grad = None
    agg_loss(loss, MASK, "seq-mean-token-mean").backward()
    assert torch.allclose(loss.grad, torch.tensor([[1 / 6, 1 / 6, 1 / 6], [1 / 4, 1 / 4, 0.0]]))
    loss.grad = None
    agg_loss(loss, MASK, "seq-mean-token-sum").backward()
    assert torch.allclose(loss.grad, MASK / 2.0)


@pytest.mark.parametrize("agg", sorted(HAND))
def test_no_valid_token_gives_zero_not_nan(agg):
    loss = torch.ones(2, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="no valid token"):
        out = agg_loss(loss, torch.zeros(2, 3), agg)
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss.grad, torch.zeros(2, 3))


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match=r"agg='token-sum': unknown aggregation; allowed: seq-mean-token-mean"):
        agg_loss(LOSS, MASK, "token-sum")
    with pytest.raises(ValueError, match=r"loss shape \(2, 3\) != mask shape \(2, 2\)"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")
