import pytest
import torch

from megatron_rl.trainer.advantages import AdvantageConfig, compute_advantages


def test_grpo_hand_computed():
    # group 7: rewards 1, 0, 0, 1 (mean 0.5); group 3: 2, 0 (mean 1); ids interleaved on purpose
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([7, 3, 7, 7, 7, 3])
    res = compute_advantages(rewards, groups, AdvantageConfig())
    torch.testing.assert_close(res.advantages, torch.tensor([0.5, 1.0, -0.5, -0.5, 0.5, -1.0]))
    assert res.num_groups == 2 and res.num_dropped_groups == 0 and res.keep.all()


def test_grpo_std_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    res = compute_advantages(rewards, groups, AdvantageConfig(std_normalize=True, eps=1e-6))
    s0 = (4 * 0.25 / 3) ** 0.5          # sample std of [1, 0, 0, 1]
    s1 = 2 ** 0.5                       # sample std of [2, 0]
    want = torch.tensor([0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6),
                         1 / (s1 + 1e-6), -1 / (s1 + 1e-6)])
    torch.testing.assert_close(res.advantages, want)


def test_rloo_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1])          # group 1 has a single sample: no baseline -> 0
    res = compute_advantages(rewards, groups, AdvantageConfig(estimator="rloo"))
    # sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3
    torch.testing.assert_close(res.advantages, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]))


def test_dynamic_sampling_drops_uniform_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    res = compute_advantages(rewards, groups, AdvantageConfig(drop_uniform_groups=True))
    # groups 0 (all 1), 2 (all 0) and the single-sample group 3 are uniform
    assert res.num_dropped_groups == 3 and res.num_groups == 4
    assert res.keep.tolist() == [False, False, True, True, False, False, False]
    torch.testing.assert_close(res.advantages, torch.tensor([0, 0, -0.5, 0.5, 0, 0, 0.0]))
    kept = compute_advantages(rewards, groups, AdvantageConfig())
    assert kept.num_dropped_groups == 0 and kept.keep.all()
    near = compute_advantages(torch.tensor([1.0, 1.0 + 1e-9]), torch.tensor([0, 0]),
                              AdvantageConfig(drop_uniform_groups=True, constant_atol=1e-6))
    assert near.num_dropped_groups == 1


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="`estimator`"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="`std_normalize`"):
        AdvantageConfig(estimator="rloo", std_normalize=True)
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([float("nan")]), torch.tensor([0]), AdvantageConfig())
    with pytest.raises(ValueError, match="same length"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]), AdvantageConfig())
    empty = compute_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), AdvantageConfig())
    assert empty.advantages.numel() == 0 and empty.num_groups == 0
