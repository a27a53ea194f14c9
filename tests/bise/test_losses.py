"""Reweighted cross-entropy and the MI estimator against hand-computed values (docs/method.md sections 4-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bise.losses import mutual_information, reweighted_cross_entropy, sample_weights, weight_table


def test_symmetric_rho_table_and_mean_one():
    table = weight_table("symmetric-rho", num_classes=10, rho=0.99)
    assert table[3, 3].item() == pytest.approx(1 / 9.9)
    assert table[3, 4].item() == pytest.approx(9 / (10 * 0.01))
    # 99 aligned + 1 conflicting sample per 100: the mean weight is 1
    y = torch.zeros(100, dtype=torch.long)
    b = torch.zeros(100, dtype=torch.long)
    b[0] = 5
    assert sample_weights(y, b, table).mean().item() == pytest.approx(1.0)


def test_group_balanced_is_one_over_groups_times_p():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    b = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
    table = weight_table("group-balanced", targets=y, bias=b, num_classes=2)
    # counts: (0,0)=3, (0,1)=1, (1,0)=1, (1,1)=3; p = counts / 8; G = 4
    expected = torch.tensor([[8 / 12, 8 / 4], [8 / 4, 8 / 12]])
    torch.testing.assert_close(table, expected)
    assert sample_weights(y, b, table).mean().item() == pytest.approx(1.0)


def test_group_balanced_counts_only_the_groups_present():
    """G is the number of non-empty (y, b) groups: with one of four empty, every present group weighs
    1 / (3 p) and the mean weight over the training samples stays 1; the empty cell weighs 0."""
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    b = torch.tensor([0, 0, 1, 1, 1, 0])
    table = weight_table("group-balanced", targets=y, bias=b, num_classes=2)
    # counts: (0,0)=3, (0,1)=1, (1,0)=0, (1,1)=2; p = counts / 6; G = 3
    expected = torch.tensor([[6 / 9, 6 / 3], [0.0, 6 / 6]])
    torch.testing.assert_close(table, expected)
    assert sample_weights(y, b, table).mean().item() == pytest.approx(1.0)


def test_empirical_joint_clamps_empty_cells():
    y = torch.tensor([0, 0, 0, 1])
    b = torch.tensor([0, 0, 0, 1])
    table = weight_table("empirical-joint", targets=y, bias=b, num_classes=2)
    # counts clamped: [[3, 1], [1, 1]], q = counts / 6, r = 1 / (4 q)
    torch.testing.assert_close(table, torch.tensor([[6 / 12, 6 / 4], [6 / 4, 6 / 4]]))


def test_two_bias_pattern_weights():
    table = weight_table("two-bias", rho=(0.99, 0.95))
    y = torch.tensor([1, 1, 1, 1])
    b = torch.tensor([[1, 1], [1, 2], [2, 1], [2, 2]])
    r = sample_weights(y, b, table)
    expected = [1 / (0.99 * 0.95), 1 / (0.99 * 0.05), 1 / (0.01 * 0.95), 1 / (0.01 * 0.05)]
    torch.testing.assert_close(r, torch.tensor(expected))


def test_reweighted_ce_is_a_plain_batch_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    b = torch.tensor([0, 2, 2, 1])
    loss = reweighted_cross_entropy(logits, y, b, scheme="symmetric-rho", rho=0.9)
    r = torch.tensor([1 / 2.7, 2 / 0.3, 1 / 2.7, 2 / 0.3])
    ce = F.cross_entropy(logits, y, reduction="none")
    assert loss.item() == pytest.approx((r * ce).sum().item() / 4, rel=1e-6)


def test_count_schemes_need_a_training_table():
    with pytest.raises(ValueError, match="group_weights"):
        reweighted_cross_entropy(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([0, 0]),
                                 scheme="group-balanced")
    with pytest.raises(ValueError, match="rho"):
        weight_table("symmetric-rho", num_classes=10, rho=1.0)
    with pytest.raises(ValueError, match="scheme"):
        weight_table("focal")
    with pytest.raises(ValueError, match="rho_left"):
        weight_table("two-bias", rho=0.99)


def _mi_by_hand(logits, b, k):
    """The section 5 estimator with explicit loops in float64."""
    p = torch.softmax(logits.double(), 1)
    n = len(b)
    joint = [[max(sum(p[j, l].item() for j in range(n) if b[j] == kk), 1e-15) / n for l in range(k)]
             for kk in range(k)]
    a = [sum(row) for row in joint]
    c = [sum(joint[kk][l] for kk in range(k)) for l in range(k)]
    return sum(joint[kk][l] * math.log(joint[kk][l] / max(a[kk] * c[l], 1e-15))
               for kk in range(k) for l in range(k)) / math.log(k)


def test_mutual_information_matches_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(6, 3)
    b = torch.tensor([0, 1, 2, 0, 1, 1])
    assert mutual_information(logits, b, 3).item() == pytest.approx(_mi_by_hand(logits, b, 3), abs=1e-6)
    mask = torch.tensor([True, False, True, True, False, True])
    assert mutual_information(logits, b, 3, sample_mask=mask).item() == pytest.approx(
        _mi_by_hand(logits[mask], b[mask], 3), abs=1e-6)


def test_mutual_information_extremes():
    b = torch.tensor([0, 1, 0, 1])
    perfect = F.one_hot(b, 2).float() * 50.0
    assert mutual_information(perfect, b, 2).item() == pytest.approx(1.0, abs=1e-5)
    assert mutual_information(torch.zeros(4, 2), b, 2).item() == pytest.approx(0.0, abs=1e-6)


def test_one_conflicting_sample_gives_zero_information_and_gradient():
    logits = torch.randn(5, 4, requires_grad=True)
    b = torch.tensor([0, 1, 2, 3, 1])
    mask = torch.tensor([False, True, False, False, False])
    mi = mutual_information(logits, b, 4, sample_mask=mask)
    assert abs(mi.item()) < 1e-6
    mi.backward()
    assert logits.grad.abs().max().item() < 1e-6


def test_empty_subset_is_zero_with_a_zero_gradient():
    logits = torch.randn(3, 2, requires_grad=True)
    mi = mutual_information(logits, torch.tensor([0, 1, 0]), 2, sample_mask=torch.zeros(3, dtype=torch.bool))
    mi.backward()
    assert mi.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))
    empty = mutual_information(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long), 2)
    assert empty.item() == 0.0 and not empty.requires_grad


def test_masked_estimate_matches_the_selected_rows():
    """Zeroing the unselected rows (no sync) equals dropping them, up to summation order."""
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,), generator=g)
    keep = torch.rand(64, generator=g) < 0.3
    masked = mutual_information(logits, bias, 4, sample_mask=keep)
    dropped = mutual_information(logits[keep], bias[keep], 4)
    torch.testing.assert_close(masked, dropped, rtol=1e-12, atol=1e-15)


def test_mutual_information_bad_arguments():
    with pytest.raises(ValueError, match="num_bias_classes"):
        mutual_information(torch.randn(2, 1), torch.tensor([0, 0]), 1)
    with pytest.raises(ValueError, match="aux_logits"):
        mutual_information(torch.randn(2, 3), torch.tensor([0, 0]), 2)


def test_count_tables_infer_the_classes_and_keep_the_bias_class_count():
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    b = torch.tensor([0, 1, 1, 0, 1, 0])
    for scheme in ("group-balanced", "empirical-joint"):
        assert weight_table(scheme, targets=y, bias=b).shape == (3, 3)  # C = max(y) + 1, K = C
        table = weight_table(scheme, targets=y, bias=b, num_classes=3, num_bias_classes=2)
        assert table.shape == (3, 2)
    q = torch.tensor([[2, 0], [0, 2], [1, 1]], dtype=torch.float64).clamp(min=1)
    torch.testing.assert_close(table, (1.0 / (9 * q / q.sum())).float())
