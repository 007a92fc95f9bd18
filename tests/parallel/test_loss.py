"""The whole loss on a vocab-parallel logits shard equals the single-process loss, for every mode, at tp 2 and 4.

One 4-rank launch: the tp=4 group and two tp=2 groups. For each config the loss, every metric and the
gradient w.r.t. this rank's logits shard are compared with compute_policy_loss run on the unsharded
logits (log_softmax over the full vocabulary) in the same process. Tolerances: tests/parallel/_reference.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rl.losses import MODES, GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.parallel import PolicyBatch, vocab_parallel_policy_loss, vocab_parallel_topk
from tests.multirank import run_ranks
from tests.parallel._reference import (ATOL, RTOL, assert_grad_close, full_logits, padded, ref_entropy, ref_logp,
                                       shard_of, tp_groups)

VOCAB, K, L = 1000, 6, 10          # vocabulary (not a multiple of tp after padding), top-K, max response length
SEGS = [10, 7, 9]                  # packed sequences (prompt 2 tokens + response)


def _configs():
    base = dict(topk=K, loss_agg_mode="token-mean")
    out = [(f"{m}", LossConfig(mode=m, **base, **({"tis_cap": 5.0} if m == "cispo" else {})), {})
           for m in MODES]
    out += [
        ("cppo topk_tv", LossConfig(mode="cppo", divergence="topk_tv", topk=K), {}),
        ("cppo topk_kl p90 sequence", LossConfig(mode="cppo", divergence="topk_kl", topk=K, delta_b_mode="p90",
                                                 horizon="sequence", delta=0.02), {}),
        ("cppo exact_tv", LossConfig(mode="cppo", divergence="exact_tv", topk=K, w_min=0.5), {}),
        ("dppo_topk_kl surrogate cap", LossConfig(mode="dppo_topk_kl", topk=K, loss_form="surrogate",
                                                  tis_cap=2.0, delta=0.01), {}),
        ("dppo_topk_tv anchor=old ids=old tis", LossConfig(mode="dppo_topk_tv", topk=K, anchor="old",
                                                           rollout_correction="tis"), {"ids_from_old": True}),
        ("dppo_binary_kl anchor=old icepop", LossConfig(mode="dppo_binary_kl", anchor="old",
                                                        rollout_correction="icepop"), {}),
        ("ppo entropy+kl T=0.7", LossConfig(mode="ppo", entropy_coef=0.01, kl_coef=0.1), {"temperature": 0.7}),
        ("gspo seq-mean-token-mean", LossConfig(mode="gspo", loss_agg_mode="seq-mean-token-mean"), {}),
        ("dppo_topk_tv seq_first b=2 entropy metric per-token T", LossConfig(mode="dppo_topk_tv", topk=K),
         {"seq_first": True, "entropy_metric": True, "temperature": "per-token"}),
        ("dppo_exact_kl seq_first b=2 per-token T", LossConfig(mode="dppo_exact_kl"),
         {"seq_first": True, "temperature": "per-token"}),
        ("cppo topk_tv bf16 per-token T", LossConfig(mode="cppo", divergence="topk_tv", topk=K, entropy_coef=0.02),
         {"dtype": torch.bfloat16, "temperature": "per-token"}),
    ]
    return out


def _batch(n_pad: int, tp: int, group, r: int, opts: dict, cfg: LossConfig):
    """Full logits, this rank's shard, a rollout batch drawn from mu (a perturbation of pi), its references."""
    g = torch.Generator().manual_seed(11)
    n = sum(SEGS)
    dtype = opts.get("dtype", torch.float32)
    x_full = full_logits(n, VOCAB, n_pad, seed=5, dtype=dtype)
    temp = opts.get("temperature", 1.0)
    if temp == "per-token":
        temp = torch.linspace(0.7, 1.3, n)
    noise = lambda s: s * torch.randn(n, VOCAB, generator=g)
    mu = ref_logp(x_full[:, :VOCAB].float() + noise(0.3), VOCAB, temp)
    old = ref_logp(x_full[:, :VOCAB].float() + noise(0.1), VOCAB, temp)
    ref = ref_logp(x_full[:, :VOCAB].float() + noise(0.2), VOCAB, temp)
    targets = torch.multinomial(mu.exp(), 1, generator=g)[:, 0]
    cu = torch.tensor([0] + SEGS).cumsum(0)
    mask = torch.ones(n, dtype=torch.bool)
    for s0 in cu[:-1]:
        mask[s0:s0 + 2] = False                                    # prompt tokens
    adv = torch.repeat_interleave(torch.tensor([1.0, -0.5, 0.0]), torch.tensor(SEGS))
    adv = adv + 0.1 * torch.randn(n, generator=g)
    anchor = old if cfg.anchor == "old" else mu
    x, shard = shard_of(x_full, VOCAB, tp, r)
    if opts.get("ids_from_old"):                                   # the trainer's own top-K of pi_old
        x_old, _ = shard_of(ref_logp_logits(x_full, noise_seed=12), VOCAB, tp, r)
        _, topk_ids = vocab_parallel_topk(x_old, K, shard, group, temperature=temp)
        old = ref_logp(ref_logp_logits(x_full, noise_seed=12)[:, :VOCAB].float(), VOCAB, temp)
        anchor = old
        torch.testing.assert_close(topk_ids, old.topk(K, dim=1).indices, rtol=0, atol=0)
    else:
        topk_ids = anchor.topk(K, dim=1).indices
    batch = PolicyBatch(
        targets=targets, rollout_logprobs=mu.gather(1, targets[:, None])[:, 0], advantages=adv, loss_mask=mask,
        cu_seqlens=cu, old_logprobs=old.gather(1, targets[:, None])[:, 0],
        ref_logprobs=ref.gather(1, targets[:, None])[:, 0] if cfg.kl_coef > 0 else None,
        topk_ids=topk_ids, anchor_topk_logprobs=anchor.gather(1, topk_ids),
        topk_ids_source="old" if opts.get("ids_from_old") else "rollout",
        anchor_full_logprobs=anchor if (cfg.divergence_name or "").startswith("exact") else None)
    return x_full, x, shard, temp, batch


def ref_logp_logits(x_full, noise_seed):
    """pi_old's logits (fp32, same padding) for the anchor='old' top-K case."""
    g = torch.Generator().manual_seed(noise_seed)
    y = x_full.float() + 0.1 * torch.randn(x_full.shape, generator=g)
    y[:, VOCAB:] = 60.0
    return y


def _reference(x_full, batch: PolicyBatch, cfg, counts, temp, entropy_metric):
    xr = x_full.float().requires_grad_(True)
    lp_all = ref_logp(xr, VOCAB, temp)
    extra = {}
    if batch.topk_ids is not None:
        extra.update(topk_ids=batch.topk_ids, anchor_topk_logprobs=batch.anchor_topk_logprobs,
                     topk_logprobs=lp_all.gather(1, batch.topk_ids))
    if cfg.entropy_coef > 0 or entropy_metric:
        extra["entropy"] = ref_entropy(lp_all)
    if batch.anchor_full_logprobs is not None:
        extra.update(full_logprobs=lp_all.detach(), anchor_full_logprobs=batch.anchor_full_logprobs)
    inputs = PolicyInputs(logprobs=lp_all.gather(1, batch.targets[:, None])[:, 0], tokens=batch.targets,
                          rollout_logprobs=batch.rollout_logprobs, advantages=batch.advantages,
                          loss_mask=batch.loss_mask, cu_seqlens=batch.cu_seqlens, old_logprobs=batch.old_logprobs,
                          ref_logprobs=batch.ref_logprobs, topk_ids_source=batch.topk_ids_source, **extra)
    loss, metrics = compute_policy_loss(cfg, inputs, counts)
    (grad,) = torch.autograd.grad(loss, xr)
    return loss, metrics, grad


def _seq_first(x, batch_b_major, b):
    """[N, W] rows in batch order (b-major [b, s]) -> Megatron's [s, b, W] (a copy made by the TEST only)."""
    s = x.shape[0] // b
    return x.view(b, s, -1).transpose(0, 1).contiguous()


def _body(rank, world):
    groups = tp_groups(world, sizes=(2, 4))
    done = []
    for tp in (2, 4):
        group, r = groups[tp]
        n_pad = padded(VOCAB, tp)
        for name, cfg, opts in _configs():
            x_full, x, shard, temp, batch = _batch(n_pad, tp, group, r, opts, cfg)
            counts = GlobalCounts(num_tokens=int(batch.loss_mask.sum()), num_sequences=len(SEGS),
                                  max_response_length=L)
            seq_first = opts.get("seq_first", False)
            ent_metric = opts.get("entropy_metric", False)
            xs = x.clone().requires_grad_(True)
            inp = _seq_first(xs, batch, 2) if seq_first else xs
            loss, metrics = vocab_parallel_policy_loss(inp, batch, cfg, counts, shard, group, temperature=temp,
                                                       seq_first=seq_first, entropy_metric=ent_metric)
            (gx,) = torch.autograd.grad(loss, xs)
            ref_loss, ref_metrics, ref_grad = _reference(x_full, batch, cfg, counts, temp, ent_metric)
            tag = f"tp={tp} rank={r} [{name}]"
            torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} loss: {m}")
            assert set(metrics) == set(ref_metrics), f"{tag}: metric keys {set(metrics) ^ set(ref_metrics)}"
            for key in ref_metrics:
                torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{tag} metric {key}: {m}")
            assert ref_grad.abs().max() > 0, f"{tag}: degenerate case, zero gradient"
            assert_grad_close(gx, ref_grad, shard, f"{tag} grad")
            # identical on every rank of the group (not only close to the reference)
            both = torch.stack([loss.detach(), loss.detach()])
            dist.all_reduce(both[:1], op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(both[1:], op=dist.ReduceOp.MIN, group=group)
            assert both[0] == both[1], f"{tag}: ranks disagree on the loss {both.tolist()}"
            done.append((tp, name, float(metrics["masked_frac"])))
    return done


def test_whole_loss_matches_single_process_every_mode_tp_2_4():
    results = run_ranks(_body, 4, timeout=300)
    names = {name for name, _, _ in _configs()}
    for res in results:
        assert {(tp, name) for tp, name, _ in res} == {(tp, name) for tp in (2, 4) for name in names}
    # the masks are exercised: some configs reject tokens, so the trust region decisions are compared too
    assert any(frac > 0 for _, name, frac in results[0] if name.startswith(("dppo", "cppo")))


def _errors_body(rank, world):
    n_pad = padded(VOCAB, world)
    cfg = LossConfig(mode="dppo_topk_tv", topk=K)
    x_full, x, shard, temp, batch = _batch(n_pad, world, dist.group.WORLD, rank, {}, cfg)
    counts = GlobalCounts(num_tokens=int(batch.loss_mask.sum()), num_sequences=len(SEGS), max_response_length=L)
    msgs = []
    bad_ids = batch.topk_ids.clone()
    bad_ids[3, 2] = VOCAB + 5                 # a padding id
    bad = PolicyBatch(**{**batch.__dict__, "topk_ids": bad_ids})
    for what, logits, b, needle in (("id", x, bad, "outside [0, vocab_size)"),
                                    ("width", x[:, :-3] if rank == 1 else x, batch, "last dimension")):
        try:
            vocab_parallel_policy_loss(logits, b, cfg, counts, shard, dist.group.WORLD)
        except ValueError as e:
            assert needle in str(e), f"{what}: {e}"
            msgs.append(str(e))
        else:
            raise AssertionError(f"{what}: no error on rank {rank}")
    return msgs


def test_whole_loss_bad_inputs_raise_on_every_rank():
    msgs = run_ranks(_errors_body, 4, timeout=120)
    assert all(len(m) == 2 and m == msgs[0] for m in msgs)


def test_policy_batch_shape_errors_name_the_field():
    n = 4
    ok = dict(targets=torch.zeros(n, dtype=torch.int64), rollout_logprobs=torch.zeros(n),
              advantages=torch.zeros(n), loss_mask=torch.ones(n))
    with pytest.raises(ValueError, match="PolicyBatch.targets"):
        PolicyBatch(**{**ok, "targets": torch.zeros(n)})
    with pytest.raises(ValueError, match="give both or neither"):
        PolicyBatch(**ok, topk_ids=torch.zeros(n, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="PolicyBatch.topk_ids"):
        PolicyBatch(**ok, topk_ids=torch.zeros(n + 1, 3, dtype=torch.int64), anchor_topk_logprobs=torch.zeros(n + 1, 3))
