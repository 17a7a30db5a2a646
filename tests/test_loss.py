"""The reward-weighted flow-matching objective and the reward-to-weight mappings."""

import math

import pytest
import torch

from gigavideo.train.loss import (
    noisy_latents_and_target,
    per_sample_flow_matching_loss,
    reward_weights,
    sample_timesteps,
    weighted_loss,
)

REWARDS = {"a": 0.2, "b": 0.6, "c": 1.0}


def test_weight_mappings_give_their_documented_values():
    assert reward_weights(REWARDS, "raw") == REWARDS
    assert reward_weights(REWARDS, "uniform") == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert reward_weights(REWARDS, "threshold", threshold=0.6) == {"a": 0.0, "b": 1.0, "c": 1.0}
    normalized = reward_weights(REWARDS, "normalized")
    assert normalized == pytest.approx({"a": 1 / 3, "b": 1.0, "c": 5 / 3})  # mean reward 0.6
    exp = reward_weights(REWARDS, "exp", temperature=0.5)
    raw = {k: math.exp(r / 0.5) for k, r in REWARDS.items()}
    mean = sum(raw.values()) / 3
    assert exp == pytest.approx({k: v / mean for k, v in raw.items()})
    with pytest.raises(ValueError, match="not in"):
        reward_weights(REWARDS, "softmax")


def test_flow_matching_target_is_noise_minus_data():
    z0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([0.0, 1.0])
    z_t, target = noisy_latents_and_target(z0, noise, t)
    torch.testing.assert_close(z_t[0], z0[0])
    torch.testing.assert_close(z_t[1], noise[1])
    torch.testing.assert_close(target, noise - z0)


def test_weighted_loss_scales_each_sample_and_a_zero_weight_gives_no_gradient():
    prediction = torch.zeros(3, 2, requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    per_sample = per_sample_flow_matching_loss(prediction, target)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 4.0, 9.0]))
    loss = weighted_loss(per_sample, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(loss, torch.tensor((0 + 2.0 + 9.0) / 3))
    loss.backward()
    assert prediction.grad[0].abs().sum() == 0 and prediction.grad[2].abs().sum() > 0


def test_timesteps_are_shifted_towards_noise_and_stay_in_range():
    gen = torch.Generator().manual_seed(0)
    plain = sample_timesteps(20000, "logit_normal", 1.0, gen)
    shifted = sample_timesteps(20000, "logit_normal", 3.0, torch.Generator().manual_seed(0))
    assert 0 < shifted.min() and shifted.max() < 1
    assert shifted.mean() > plain.mean() + 0.1
    assert abs(plain.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
@pytest.mark.parametrize("t_range", [(0.875, 1.0), (0.0, 0.875)])
def test_an_experts_timesteps_are_the_distribution_conditioned_on_its_side_of_the_boundary(method, t_range):
    lo, hi = t_range
    t = sample_timesteps(50000, method, 12.0, torch.Generator().manual_seed(0), t_range=t_range)
    assert lo <= t.min() and t.max() < hi  # never on the other side, even by rounding
    whole = sample_timesteps(400000, method, 12.0, torch.Generator().manual_seed(1))
    kept = whole[(whole >= lo) & (whole < hi)]  # the same distribution by rejection
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(t.quantile(quantiles), kept.quantile(quantiles), atol=0.005, rtol=0)


def test_the_advantage_mapping_trains_only_on_samples_better_than_the_average():
    weights = reward_weights(REWARDS, "advantage")  # mean 0.6: gains 0, 0, 0.4; their mean 0.4 / 3
    assert weights == pytest.approx({"a": 0.0, "b": 0.0, "c": 3.0})
    assert sum(weights.values()) / len(weights) == pytest.approx(1.0)
    assert reward_weights({"a": 0.5, "b": 0.5}, "advantage") == {"a": 0.0, "b": 0.0}  # nothing is better
