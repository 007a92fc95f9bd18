"""Bad input gets a clear ValueError naming the argument; the padded layout converts to the packed one."""

import math

import pytest
import torch

from megatron_rl.losses import GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss, padded_to_packed

from ._gen import random_batch


def _base(n=6, k=3):
    gen = torch.Generator().manual_seed(0)
    return random_batch(gen, [2, n - 2], v=8, k=k)


def _with(**changes):
    kw = _base()
    kw.update(changes)
    return kw


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value", [
    ("logprobs", torch.tensor([-1.0, NAN, -1, -1, -1, -1])),
    ("logprobs", torch.tensor([-1.0, -INF, -1, -1, -1, -1])),
    ("rollout_logprobs", torch.tensor([-1.0, -1, INF, -1, -1, -1])),
    ("old_logprobs", torch.tensor([NAN] * 6)),
    ("advantages", torch.tensor([0.0, 0, 0, 0, 0, NAN])),
    ("ref_logprobs", torch.tensor([-1.0, -1, -1, -1, -1, -INF])),
    ("entropy", torch.tensor([NAN] * 6)),
])
def test_nan_or_inf_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"PolicyInputs\.{field}: contains NaN or inf"):
        PolicyInputs(**_with(**{field: value}))


def test_nan_in_topk_and_full_logprobs_is_refused():
    kw = _base()
    bad = kw["topk_logprobs"].clone()
    bad[1, 2] = NAN
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_logprobs: contains NaN"):
        PolicyInputs(**dict(kw, topk_logprobs=bad))
    bad = kw["anchor_full_logprobs"].clone()
    bad[0, 0] = -INF
    with pytest.raises(ValueError, match=r"PolicyInputs\.anchor_full_logprobs: contains NaN or inf"):
        PolicyInputs(**dict(kw, anchor_full_logprobs=bad))


@pytest.mark.parametrize("field, value", [
    ("advantages", torch.zeros(5)), ("loss_mask", torch.ones(7)), ("rollout_logprobs", torch.zeros(6, 1)),
    ("old_logprobs", torch.zeros(3)), ("tokens", torch.zeros(4, dtype=torch.long)), ("entropy", torch.zeros(2, 3)),
])
def test_shape_mismatch_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PolicyInputs\.{field}: expected shape \[6\]"):
        PolicyInputs(**_with(**{field: value}))


def test_logprobs_must_be_flat():
    with pytest.raises(ValueError, match=r"PolicyInputs\.logprobs: expected shape \[N\].*from_padded"):
        PolicyInputs(**_with(logprobs=torch.zeros(2, 3)))


@pytest.mark.parametrize("cu, msg", [
    (torch.tensor([0, 2, 5]), "does not cover the tokens"),     # ends at 5, N = 6
    (torch.tensor([0, 2, 7]), "does not cover the tokens"),
    (torch.tensor([1, 2, 6]), r"cu_seqlens\[0\] must be 0"),
    (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
    (torch.tensor([0.0, 6.0]), "integer"),
    (torch.tensor([[0, 6]]), "integer tensor"),
])
def test_bad_cu_seqlens(cu, msg):
    with pytest.raises(ValueError, match=rf"PolicyInputs\.cu_seqlens: .*{msg}"):
        PolicyInputs(**_with(cu_seqlens=cu))


def test_topk_k_disagreement_names_the_argument():
    kw = _base()
    with pytest.raises(ValueError, match=r"PolicyInputs\.anchor_topk_logprobs: K disagrees with topk_ids"):
        PolicyInputs(**dict(kw, anchor_topk_logprobs=kw["anchor_topk_logprobs"][:, :2]))
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_logprobs: K disagrees with topk_ids"):
        PolicyInputs(**dict(kw, topk_logprobs=torch.zeros(6, 4)))
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_ids: expected an integer"):
        PolicyInputs(**dict(kw, topk_ids=kw["topk_ids"].float()))
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_logprobs: required together"):
        PolicyInputs(**dict(kw, topk_logprobs=None))
    with pytest.raises(ValueError, match=r"PolicyInputs\.tokens: required with topk_ids"):
        PolicyInputs(**dict(kw, tokens=None))
    with pytest.raises(ValueError, match=r"PolicyInputs\.anchor_full_logprobs: expected \(6, 8\)"):
        PolicyInputs(**dict(kw, anchor_full_logprobs=torch.zeros(6, 7)))
    # K of the inputs vs the configured K
    inp = PolicyInputs(**kw)
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_ids: K=3 but LossConfig\.topk=20"):
        compute_policy_loss(LossConfig(mode="dppo_topk_tv"), inp, GlobalCounts(6, 2, 8))


def test_other_bad_fields():
    with pytest.raises(ValueError, match=r"PolicyInputs\.loss_mask: values must be 0 or 1"):
        PolicyInputs(**_with(loss_mask=torch.tensor([0, 1, 2, 1, 1, 1])))
    with pytest.raises(ValueError, match=r"PolicyInputs\.seg_num_tokens: expected shape \[2\]"):
        PolicyInputs(**_with(seg_num_tokens=torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match=r"PolicyInputs\.seg_tokens_before: counts must be >= 0"):
        PolicyInputs(**_with(seg_tokens_before=torch.tensor([0, -1])))
    with pytest.raises(ValueError, match=r"PolicyInputs\.topk_ids_source: got 'vllm'"):
        PolicyInputs(**_with(topk_ids_source="vllm"))
    with pytest.raises(ValueError, match=r"PolicyInputs\.advantages: expected a floating-point"):
        PolicyInputs(**_with(advantages=torch.ones(6, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"PolicyInputs\.advantages: required tensor, got list"):
        PolicyInputs(**_with(advantages=[0.0] * 6))
    for field, value in [("num_tokens", -1), ("num_sequences", "3")]:
        with pytest.raises(ValueError, match=rf"GlobalCounts\.{field}"):
            GlobalCounts(**dict(dict(num_tokens=1, num_sequences=1), **{field: value}))
    with pytest.raises(ValueError, match=r"GlobalCounts\.max_response_length"):
        GlobalCounts(1, 1, 0)


@pytest.mark.parametrize("cfg, counts, field", [
    (LossConfig(anchor="old"), GlobalCounts(6, 2, 8), r"PolicyInputs\.old_logprobs"),
    (LossConfig(mode="cppo"), GlobalCounts(6, 2), r"GlobalCounts\.max_response_length"),
    (LossConfig(mode="ppo", loss_agg_mode="seq-mean-token-sum-norm"), GlobalCounts(6, 2), r"GlobalCounts\.max_response_length"),
    (LossConfig(kl_coef=0.1), GlobalCounts(6, 2, 8), r"PolicyInputs\.ref_logprobs"),
    (LossConfig(entropy_coef=0.1), GlobalCounts(6, 2, 8), r"PolicyInputs\.entropy"),
    (LossConfig(mode="dppo_exact_kl"), GlobalCounts(6, 2, 8), r"PolicyInputs\.full_logprobs"),
    (LossConfig(mode="dppo_topk_kl", topk=3), GlobalCounts(6, 2, 8), r"PolicyInputs\.topk_ids"),
    (LossConfig(mode="cppo", horizon="max"), GlobalCounts(6, 2, 3), r"max_response_length"),   # t > T
])
def test_missing_inputs_for_the_configured_mode(cfg, counts, field):
    kw = _base()
    for name in ("old_logprobs", "topk_ids", "anchor_topk_logprobs", "topk_logprobs", "full_logprobs",
                 "anchor_full_logprobs"):
        kw.pop(name, None)
    kw["loss_mask"] = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=field):
        compute_policy_loss(cfg, PolicyInputs(**kw), counts)


def test_wrong_argument_types():
    inp = PolicyInputs(**_base())
    with pytest.raises(ValueError, match="cfg: expected a LossConfig"):
        compute_policy_loss({"mode": "ppo"}, inp, GlobalCounts(6, 2, 8))
    with pytest.raises(ValueError, match="counts: expected GlobalCounts"):
        compute_policy_loss(LossConfig(), inp, 6)


def test_padded_to_packed_and_from_padded():
    b, l, k = 3, 4, 2
    lp = -torch.rand(b, l)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out = padded_to_packed(logprobs=lp, loss_mask=mask, topk_ids=torch.zeros(b, l, k, dtype=torch.long),
                           seg_num_tokens=torch.tensor([2, 4, 0]))
    assert out["cu_seqlens"].tolist() == [0, 4, 8, 12]
    assert torch.equal(out["logprobs"], lp.reshape(-1)) and out["topk_ids"].shape == (12, k)
    assert out["seg_num_tokens"].tolist() == [2, 4, 0]
    inp = PolicyInputs.from_padded(logprobs=lp, rollout_logprobs=lp.clone(), advantages=torch.ones(b, l),
                                   loss_mask=mask)
    assert inp.num_segments == 3 and inp.num_tokens == 12
    with pytest.raises(ValueError, match=r"padded_to_packed: advantages has shape \(3, 5\)"):
        padded_to_packed(loss_mask=mask, advantages=torch.ones(3, 5))
    with pytest.raises(ValueError, match="padded_to_packed: loss_mask"):
        padded_to_packed(logprobs=lp)
    # an all-masked padded batch is fine: zero loss, finite metrics
    loss, met = compute_policy_loss(LossConfig(), PolicyInputs.from_padded(
        logprobs=lp.requires_grad_(), rollout_logprobs=lp.detach().clone(), advantages=torch.ones(b, l),
        loss_mask=torch.zeros(b, l)), GlobalCounts(0, 0, l))
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in met.values())
