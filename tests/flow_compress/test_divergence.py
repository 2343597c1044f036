import pytest
import torch

from flow_compress.criteria import divergence


def test_conv_channel_scores_follow_the_formula() -> None:
    weight = torch.zeros(2, 1, 1, 1)
    weight[0, 0, 0, 0] = 3.0
    weight[1, 0, 0, 0] = 4.0
    act = torch.tensor([2.0, 1.0])
    scores = divergence.conv_channel_scores(act, weight, spatial_size=5)
    # δ = E||A|| · ||W|| / (C · S) = [2·3, 1·4] / (2·5)
    assert torch.allclose(scores, torch.tensor([0.6, 0.4]))


def test_conv_scores_compare_across_layers_by_width_and_resolution() -> None:
    w = torch.ones(4, 3, 3, 3)
    act = torch.ones(4)
    small = divergence.conv_channel_scores(act, w, spatial_size=4)
    large = divergence.conv_channel_scores(act, w, spatial_size=16)
    assert torch.allclose(small, 4 * large)


def test_linear_scores_divide_by_width_and_tokens() -> None:
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    act = torch.tensor([1.0, 2.0, 0.0])
    scores = divergence.linear_neuron_scores(act, weight, tokens=2)
    assert torch.allclose(scores, torch.tensor([5.0 / 6, 2.0 / 6, 0.0]))


def test_head_scores_sum_projection_norms_per_head() -> None:
    heads, dh, d = 2, 2, 4
    wq = torch.zeros(heads * dh, d)
    wq[:dh] = 1.0  # head 0 has ||W_Q,0||_F = sqrt(8)
    wk = torch.zeros(heads * dh, d)
    wv = torch.zeros(heads * dh, d)
    wv[dh:] = 2.0  # head 1 has ||W_V,1||_F = sqrt(32)
    out = torch.tensor([1.0, 0.5])
    scores = divergence.head_scores(out, wq, wk, wv, num_heads=heads, tokens=4)
    expected = torch.tensor([8**0.5 / 4, 0.5 * 32**0.5 / 4])
    assert torch.allclose(scores, expected)


def test_residual_score_is_mean_ratio() -> None:
    branch = torch.tensor([1.0, 3.0])
    x = torch.tensor([2.0, 3.0])
    assert divergence.residual_score(branch, x) == pytest.approx((0.5 + 1.0) / 2, rel=1e-5)


def test_scores_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        divergence.conv_channel_scores(torch.ones(3), torch.ones(2, 1, 1, 1), 1)
    with pytest.raises(ValueError):
        divergence.residual_score(torch.ones(2), torch.ones(3))


def test_consumer_weights_are_max_normalised() -> None:
    w = divergence.consumer_weights([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])])
    assert torch.allclose(w, torch.tensor([0.75, 1.0]))
