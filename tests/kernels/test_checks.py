"""Bad input: named ValueError / TypeError before any kernel runs, nothing silently clamped."""

import pytest
import torch

import bise_kernels as bk


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(density):
    with pytest.raises(ValueError, match="density"):
        bk.topk_mask(torch.randn(5), density)


def test_density_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="density"):
        bk.topk_mask(torch.randn(5), "0.5")


@pytest.mark.parametrize("k", [0, 6, -1])
def test_k_outside_range_is_rejected(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        bk.topk_threshold(torch.randn(5), k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected(bad):
    scores = torch.randn(6)
    scores[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        bk.topk_mask(scores, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        bk.masked_linear(torch.randn(2, 3), torch.randn(2, 3), None, scores.reshape(2, 3), density=0.5)


def test_empty_and_integer_scores_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        bk.topk_mask(torch.empty(0), 0.5)
    with pytest.raises(TypeError, match="floating"):
        bk.topk_mask(torch.arange(5), 0.5)


def test_global_mode_rejects_mixed_dtypes_and_non_lists():
    with pytest.raises(TypeError, match=r"scores\[1\] has dtype"):
        bk.global_topk_masks([torch.randn(3), torch.randn(3, dtype=torch.float64)], 0.5)
    with pytest.raises(TypeError, match="list"):
        bk.global_topk_masks(torch.randn(3), 0.5)
    with pytest.raises(ValueError, match="empty"):
        bk.global_topk_masks([], 0.5)


def test_scores_shape_must_match_weight_or_output_units():
    with pytest.raises(ValueError, match=r"scores must have weight's shape \(4, 3\) or \(4,\)"):
        bk.masked_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3), density=0.5)


def test_exactly_one_of_density_and_threshold():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="exactly one"):
        bk.masked_linear(x, w, None, s)
    with pytest.raises(ValueError, match="exactly one"):
        bk.masked_linear(x, w, None, s, density=0.5, threshold=0.0)


def test_mismatched_dtypes_and_shapes_are_named():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3)
    with pytest.raises(TypeError, match="weight has dtype"):
        bk.masked_linear(x, w, None, s, density=0.5)
    with pytest.raises(ValueError, match="bias must have shape"):
        bk.masked_linear(x, w.float(), torch.randn(3), s, density=0.5)
    with pytest.raises(ValueError, match="does not match weight"):
        bk.masked_linear(torch.randn(2, 5), w.float(), None, s, density=0.5)


def test_bad_estimator_and_temperature():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="estimator"):
        bk.masked_linear(x, w, None, s, density=0.5, estimator="gumbel")
    with pytest.raises(ValueError, match="temperature"):
        bk.masked_linear(x, w, None, s, density=0.5, estimator="sigmoid", temperature=0.0)


def test_conv_arguments_are_checked():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match="groups=3"):
        bk.masked_conv2d(x, w, None, torch.randn(6), threshold=0.0, groups=3)
    with pytest.raises(TypeError, match="stride"):
        bk.masked_conv2d(x, w, None, torch.randn(6), threshold=0.0, stride=(1, 2, 3), groups=2)


def test_channel_gate_arguments_are_checked():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\)"):
        bk.channel_gate(x, torch.randn(4))
    with pytest.raises(ValueError, match="dim must be in"):
        bk.channel_gate(x, torch.randn(3), dim=3)
    with pytest.raises(ValueError, match="num_channels"):
        bk.ChannelGate(0)


def test_hint_must_be_a_single_value():
    with pytest.raises(TypeError, match="hint"):
        bk.topk_mask(torch.randn(5), 0.5, hint=torch.randn(2))
