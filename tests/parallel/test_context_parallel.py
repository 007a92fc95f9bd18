"""Context parallel for the loss: split across CP ranks == unsplit, on synthetic per-token tensors.

For CP in {1, 2, 4} (CP 1 in-process, 2 and 4 on gloo; one launch each): a packed row of segments of
odd lengths (each padded to a multiple of 2 * cp, plus a padding tail) is split in Megatron's
load-balanced order. Each rank builds its local PolicyInputs, completes them with `with_cp_fields`
(one all-gather) and runs compute_policy_loss with the global counts of the unsplit row. Checked:
- the CPPO mask (cppo_mask with the seg_* fields) equals the unsplit mask at every local position, for
  horizon 'sequence' and 'max', delta_b 'fixed' and 'p90' (exact equality);
- the losses summed over ranks equal the unsplit loss (rtol 1e-6: the loss is an fp32 scalar, summed
  in another order) and the gradient w.r.t. logprobs at every position equals the unsplit gradient
  (rtol 1e-6, atol 1e-9), for cppo (binary TV and top-K TV), dppo_topk_kl, ppo and gspo;
- a second row whose segments are all shorter than cp, so that CP rank 3 of 4 holds only padding: same
  checks (that rank's loss is 0, and it joined every collective: no deadlock).
"""

from __future__ import annotations


import pytest
import torch

from tests.multirank import run_ranks

K = 3


def _row(lengths, cp, seed, tail=3):
    """Unsplit packed row: segments padded to 2 * cp multiples, then a padding tail (also a multiple)."""
    g = torch.Generator().manual_seed(seed)
    pad = 2 * cp
    bounds = [0]
    for L in lengths:
        bounds.append(bounds[-1] + -(-L // pad) * pad)
    total = bounds[-1] + tail * pad
    bounds.append(total)
    mask = torch.zeros(total)
    for a, L in zip(bounds[:-2], lengths):
        p = int(torch.randint(0, max(1, L // 3) + 1, (1,), generator=g))   # a prompt prefix
        mask[a + p:a + L] = 1
    adv = torch.zeros(total)
    for a, b in zip(bounds[:-1], bounds[1:]):
        adv[a:b] = float(torch.randn(1, generator=g))
    mu = torch.log(torch.rand(total, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    far = torch.log(torch.rand(total, generator=g, dtype=torch.float64) * 0.5 + 0.01)
    near = mu + 0.05 * torch.randn(total, generator=g, dtype=torch.float64)
    lp = torch.where(torch.rand(total, generator=g) < 0.6, near, far)   # pi near mu on most tokens
    ids = torch.stack([torch.randperm(50, generator=g)[:K] for _ in range(total)])
    tokens = torch.randint(0, 50, (total,), generator=g)
    mu_k = torch.log(torch.softmax(torch.randn(total, K, generator=g, dtype=torch.float64), -1) * 0.4)
    pi_k = torch.log(torch.softmax(torch.randn(total, K, generator=g, dtype=torch.float64), -1) * 0.4)
    return dict(cu=torch.tensor(bounds), mask=mask, adv=adv, lp=lp, mu=mu, ids=ids, tokens=tokens,
                mu_k=mu_k, pi_k=pi_k)


def _inputs(row, index=None, cu=None):
    from megatron_rl.losses import PolicyInputs

    pick = (lambda t: t) if index is None else (lambda t: t[index])
    lp = pick(row["lp"]).clone().requires_grad_(True)
    inp = PolicyInputs(logprobs=lp, rollout_logprobs=pick(row["mu"]), advantages=pick(row["adv"]),
                       loss_mask=pick(row["mask"]), cu_seqlens=row["cu"] if cu is None else cu,
                       tokens=pick(row["tokens"]), topk_ids=pick(row["ids"]),
                       anchor_topk_logprobs=pick(row["mu_k"]), topk_logprobs=pick(row["pi_k"]))
    return inp, lp


def _configs():
    from megatron_rl.losses import LossConfig

    return [
        LossConfig(mode="cppo", horizon="sequence", delta=0.05, delta_b=0.1),
        LossConfig(mode="cppo", horizon="max", divergence="topk_tv", topk=K, delta_b_mode="p90"),
        LossConfig(mode="cppo", horizon="sequence", divergence="topk_tv", topk=K, w_min=0.5,
                   loss_agg_mode="seq-mean-token-mean"),
        LossConfig(mode="dppo_topk_kl", topk=K, loss_agg_mode="token-mean"),
        LossConfig(mode="ppo"),
        LossConfig(mode="gspo", loss_agg_mode="seq-mean-token-mean"),
    ]


ROWS = {"odd": [7, 13, 5, 1, 9], "short": [1, 3, 2, 3]}
MAX_LEN = 16


def _counts(row):
    from megatron_rl.losses import GlobalCounts, segment_ids, segment_sum

    m = row["mask"] != 0
    seg = segment_ids(row["cu"], m.numel())
    per = segment_sum(m.to(torch.int64), seg, row["cu"].numel() - 1)
    return GlobalCounts(int(per.sum()), int((per > 0).sum()), MAX_LEN)


def _cppo_inside(cfg, inp):
    """CPPO's inside-the-budget mask of these inputs (None for other modes); a CP rank's inputs carry the
    whole-sequence seg_* fields, unsplit ones have None there (the local scan)."""
    from megatron_rl.losses import cppo_mask
    from megatron_rl.parallel.context_parallel import local_divergence

    if not cfg.needs.cp_scan:
        return None
    return cppo_mask(local_divergence(cfg, inp), inp.loss_mask, inp.cu_seqlens, delta=cfg.delta_bounds[0],
                     w_min=cfg.w_min, horizon=cfg.horizon, max_response_length=MAX_LEN,
                     delta_b_mode=cfg.delta_b_mode, delta_b=cfg.delta_b, delta_b_min=cfg.delta_b_min,
                     cap_mult=cfg.cap_mult, seg_num_tokens=inp.seg_num_tokens,
                     seg_tokens_before=inp.seg_tokens_before, seg_prefix_z=inp.seg_prefix_z,
                     seg_delta_b=inp.seg_delta_b).inside


def _unsplit(row, cfg):
    from megatron_rl.losses import compute_policy_loss

    inp, lp = _inputs(row)
    loss, _ = compute_policy_loss(cfg, inp, _counts(row))
    loss.backward()
    return float(loss), lp.grad.clone(), _cppo_inside(cfg, inp)


def body(rank, world, cp):
    import torch.distributed as dist

    from megatron_rl.losses import compute_policy_loss
    from megatron_rl.parallel.context_parallel import partition_index, with_cp_fields

    group = dist.group.WORLD if world > 1 else None
    out = {}
    for row_name, lengths in ROWS.items():
        row = _row(lengths, cp, seed=len(lengths))
        index, local_cu = partition_index(row["cu"], cp, rank)
        for ci, cfg in enumerate(_configs()):
            inp, lp = _inputs(row, index, local_cu)
            inp = with_cp_fields(cfg, inp, group, MAX_LEN)
            loss, _ = compute_policy_loss(cfg, inp, _counts(row))
            loss.backward()
            mask = _cppo_inside(cfg, inp)
            total = loss.detach().to(torch.float64).reshape(1).clone()
            if group is not None:
                dist.all_reduce(total, group=group)
            out[(row_name, ci)] = dict(index=index, loss=float(loss.detach()), total=float(total), grad=lp.grad.clone(),
                                       mask=mask, loss_tokens=int((inp.loss_mask != 0).sum()))
    return out


def _check(results, cp):
    mixed = []
    for row_name, lengths in ROWS.items():
        row = _row(lengths, cp, seed=len(lengths))
        for ci, cfg in enumerate(_configs()):
            ref_loss, ref_grad, ref_mask = _unsplit(row, cfg)
            seen = torch.zeros(row["mask"].numel(), dtype=torch.int64)
            for rank, res in enumerate(results):
                r = res[(row_name, ci)]
                seen[r["index"]] += 1
                assert r["total"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-9), (row_name, cfg.mode, rank)
                torch.testing.assert_close(r["grad"], ref_grad[r["index"]], rtol=1e-6, atol=1e-9)
                if ref_mask is not None:
                    assert torch.equal(r["mask"], ref_mask[r["index"]]), (row_name, ci, rank)
            assert torch.equal(seen, torch.ones_like(seen))   # the split covers the row exactly once
            if ref_mask is not None and row_name == "odd":
                m = row["mask"] != 0
                mixed.append(0 < int((~ref_mask & m).sum()) < int(m.sum()))
    assert any(mixed), "some CPPO mask must reject some loss tokens and keep others"
    if cp == 4:   # the short row: CP rank 3 holds chunks 3 and 4 of every segment: padding only
        r3 = results[3][("short", 0)]
        assert r3["loss_tokens"] == 0 and r3["loss"] == 0.0


def test_cp1_in_process():
    _check([body(0, 1, 1)], 1)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_split_equals_unsplit(cp):
    _check(run_ranks(body, cp, args=(cp,), timeout=120), cp)


def test_partition_is_megatron_load_balanced_order():
    from megatron_rl.parallel.context_parallel import partition_index

    # one segment of 8 at cp 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    cu = torch.tensor([0, 8, 12])
    idx0, lc0 = partition_index(cu, 2, 0)
    idx1, lc1 = partition_index(cu, 2, 1)
    assert idx0.tolist() == [0, 1, 6, 7, 8, 11] and lc0.tolist() == [0, 2, 4, 5, 6]
    assert idx1.tolist() == [2, 3, 4, 5, 9, 10] and lc1.tolist() == [0, 2, 4, 5, 6]
    with pytest.raises(ValueError, match="pad_multiple=4"):
        partition_index(torch.tensor([0, 6]), 2, 0)
