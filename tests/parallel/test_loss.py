"""The whole loss on a vocab-parallel logits shard equals the single-process loss, for every mode, at tp 1, 2, 4.

One 4-rank launch: the tp=4 group and two tp=2 groups (tp=1, group None, in-process). For each config the
loss, every metric and the gradient w.r.t. this rank's logits shard are compared with compute_policy_loss
run on the unsharded logits (log_softmax over the full vocabulary) in the same process, from the same
`rollout` fields. Context parallel (the loss's cp_group hook): tp 2 x cp 2 on 4 ranks, the losses summed
over the CP group and each rank's gradient rows equal the unsplit ones. Tolerances: tests/parallel/_reference.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rl.losses import MODES, GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.parallel import ROLLOUT_FIELDS, VocabShard, vocab_parallel_policy_loss, vocab_parallel_topk
from megatron_rl.parallel.context_parallel import partition_index
from tests.multirank import run_ranks
from tests.parallel._reference import (ATOL, RTOL, assert_grad_close, full_logits, padded, ref_entropy, ref_logp,
                                       shard_of, tp_groups)

VOCAB, K, L = 1000, 6, 10          # vocabulary (not a multiple of tp after padding), top-K, max response length
SEGS = [10, 7, 9]                  # packed sequences (prompt 2 tokens + response)
CP_SEGS = [12, 8, 12]              # the same, each a multiple of 2 x cp = 4 (Megatron's CP split)


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
        # a float T on bf16 logits: z = float32(x) / T in fp32 (a bf16 division was ~1e-1 off in log p)
        ("cppo topk_tv bf16 T=0.7", LossConfig(mode="cppo", divergence="topk_tv", topk=K, entropy_coef=0.02),
         {"dtype": torch.bfloat16, "temperature": 0.7}),
    ]
    return out


def _batch(n_pad: int, tp: int, group, r: int, opts: dict, cfg: LossConfig, segs=SEGS):
    """Full logits, this rank's shard, the rollout fields (PolicyInputs names) drawn from mu (a perturbation
    of pi), the temperature."""
    g = torch.Generator().manual_seed(11)
    n = sum(segs)
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
    cu = torch.tensor([0] + segs).cumsum(0)
    mask = torch.ones(n, dtype=torch.bool)
    for s0 in cu[:-1]:
        mask[s0:s0 + 2] = False                                    # prompt tokens
    adv = torch.repeat_interleave(torch.tensor([1.0, -0.5, 0.0]), torch.tensor(segs))
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
    rollout = dict(
        tokens=targets, rollout_logprobs=mu.gather(1, targets[:, None])[:, 0], advantages=adv, loss_mask=mask,
        cu_seqlens=cu, old_logprobs=old.gather(1, targets[:, None])[:, 0],
        ref_logprobs=ref.gather(1, targets[:, None])[:, 0] if cfg.kl_coef > 0 else None,
        topk_ids=topk_ids, anchor_topk_logprobs=anchor.gather(1, topk_ids),
        topk_ids_source="old" if opts.get("ids_from_old") else "rollout",
        anchor_full_logprobs=anchor if cfg.needs.full_logprobs else None)
    return x_full, x, shard, temp, rollout


def ref_logp_logits(x_full, noise_seed):
    """pi_old's logits (fp32, same padding) for the anchor='old' top-K case."""
    g = torch.Generator().manual_seed(noise_seed)
    y = x_full.float() + 0.1 * torch.randn(x_full.shape, generator=g)
    y[:, VOCAB:] = 60.0
    return y


def _reference(x_full, rollout: dict, cfg, counts, temp, entropy_metric):
    """compute_policy_loss on the unsharded logits, from the same rollout fields."""
    xr = x_full.float().requires_grad_(True)
    lp_all = ref_logp(xr, VOCAB, temp)
    pi = {}
    if rollout["topk_ids"] is not None:
        pi["topk_logprobs"] = lp_all.gather(1, rollout["topk_ids"])
    if cfg.entropy_coef > 0 or entropy_metric:
        pi["entropy"] = ref_entropy(lp_all)
    if rollout["anchor_full_logprobs"] is not None:
        pi["full_logprobs"] = lp_all.detach()
    inputs = PolicyInputs(logprobs=lp_all.gather(1, rollout["tokens"][:, None])[:, 0], **rollout, **pi)
    loss, metrics = compute_policy_loss(cfg, inputs, counts)
    (grad,) = torch.autograd.grad(loss, xr)
    return loss, metrics, grad


def _seq_first(x, b):
    """[N, W] rows in batch order (b-major [b, s]) -> Megatron's [s, b, W] (a copy made by the TEST only)."""
    s = x.shape[0] // b
    return x.view(b, s, -1).transpose(0, 1).contiguous()


def _check_config(tp, group, r, name, cfg, opts) -> float:
    """One config at one TP size: loss, metrics and shard gradient vs the unsharded reference."""
    x_full, x, shard, temp, rollout = _batch(padded(VOCAB, tp), tp, group, r, opts, cfg)
    counts = GlobalCounts(num_tokens=int(rollout["loss_mask"].sum()), num_sequences=len(SEGS), max_response_length=L)
    seq_first = opts.get("seq_first", False)
    ent_metric = opts.get("entropy_metric", False)
    xs = x.clone().requires_grad_(True)
    inp = _seq_first(xs, 2) if seq_first else xs
    loss, metrics = vocab_parallel_policy_loss(inp, rollout, cfg, counts, shard, group, temperature=temp,
                                               seq_first=seq_first, entropy_metric=ent_metric)
    (gx,) = torch.autograd.grad(loss, xs)
    ref_loss, ref_metrics, ref_grad = _reference(x_full, rollout, cfg, counts, temp, ent_metric)
    tag = f"tp={tp} rank={r} [{name}]"
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} loss: {m}")
    assert set(metrics) == set(ref_metrics), f"{tag}: metric keys {set(metrics) ^ set(ref_metrics)}"
    for key in ref_metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{tag} metric {key}: {m}")
    assert ref_grad.abs().max() > 0, f"{tag}: degenerate case, zero gradient"
    assert_grad_close(gx, ref_grad, shard, f"{tag} grad")
    if group is not None:   # identical on every rank of the group (not only close to the reference)
        both = torch.stack([loss.detach(), loss.detach()])
        dist.all_reduce(both[:1], op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(both[1:], op=dist.ReduceOp.MIN, group=group)
        assert both[0] == both[1], f"{tag}: ranks disagree on the loss {both.tolist()}"
    return float(metrics["masked_frac"])


def _body(rank, world):
    groups = tp_groups(world, sizes=(2, 4))
    done = []
    for tp in (2, 4):
        group, r = groups[tp]
        for name, cfg, opts in _configs():
            done.append((tp, name, _check_config(tp, group, r, name, cfg, opts)))
    return done


def test_whole_loss_matches_single_process_every_mode_tp1():
    for name, cfg, opts in _configs():
        _check_config(1, None, 0, name, cfg, opts)


def test_whole_loss_inplace_backward_leaves_the_same_gradient_in_the_logits():
    """What the Megatron step runs (policy_loss_fn passes inplace_backward=True): same loss and gradient,
    the gradient written into the logits' own storage."""
    cfg = LossConfig(mode="cppo", divergence="topk_tv", topk=K, entropy_coef=0.02)
    x_full, x, shard, temp, rollout = _batch(padded(VOCAB, 1), 1, None, 0, {"temperature": 0.8}, cfg)
    counts = GlobalCounts(num_tokens=int(rollout["loss_mask"].sum()), num_sequences=len(SEGS), max_response_length=L)
    out = {}
    for inplace in (False, True):
        xs = x.clone().requires_grad_(True)
        logits = xs * 1.0                       # a non-leaf, like the output layer's output
        loss, _ = vocab_parallel_policy_loss(logits, rollout, cfg, counts, shard, None, temperature=temp,
                                             inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss, logits)
        assert (g.data_ptr() == logits.data_ptr()) == inplace
        out[inplace] = (loss.detach(), g)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=0)


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
    x_full, x, shard, temp, rollout = _batch(n_pad, world, dist.group.WORLD, rank, {}, cfg)
    counts = GlobalCounts(num_tokens=int(rollout["loss_mask"].sum()), num_sequences=len(SEGS), max_response_length=L)
    msgs = []
    bad_ids = rollout["topk_ids"].clone()
    bad_ids[3, 2] = VOCAB + 5                 # a padding id
    bad = {**rollout, "topk_ids": bad_ids}
    for what, logits, b, needle in (("id", x, bad, "outside [0, vocab_size)"),
                                    ("width", x[:, :-3] if rank == 1 else x, rollout, "last dimension")):
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


def test_rollout_field_errors_name_the_field():
    """Raised before the vocabulary pass (no collective: the group is never touched)."""
    n = 4
    ok = dict(tokens=torch.zeros(n, dtype=torch.int64), rollout_logprobs=torch.zeros(n),
              advantages=torch.zeros(n), loss_mask=torch.ones(n))
    x, shard, cfg = torch.zeros(n, 128), VocabShard(0, 128, 100), LossConfig(mode="ppo")
    counts = GlobalCounts(num_tokens=n, num_sequences=1)

    def call(rollout):
        vocab_parallel_policy_loss(x, rollout, cfg, counts, shard, "no group: must not be reached")

    with pytest.raises(ValueError, match=r"rollout\['tokens'\]"):
        call({**ok, "tokens": torch.zeros(n)})
    with pytest.raises(ValueError, match="give both or neither"):
        call({**ok, "topk_ids": torch.zeros(n, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"rollout\['topk_ids'\]"):
        call({**ok, "topk_ids": torch.zeros(n + 1, 3, dtype=torch.int64), "anchor_topk_logprobs": torch.zeros(n + 1, 3)})
    with pytest.raises(ValueError, match="unknown field.*'logprobs'"):
        call({**ok, "logprobs": torch.zeros(n)})
    assert "logprobs" not in ROLLOUT_FIELDS and {"tokens", "seg_num_tokens"} <= set(ROLLOUT_FIELDS)


# ---- context parallel: tp 2 x cp 2 -------------------------------------------------------------------

def _cp_configs():
    return [
        ("cppo topk_tv p90 sequence", LossConfig(mode="cppo", divergence="topk_tv", topk=K, delta_b_mode="p90",
                                                 horizon="sequence", delta=0.02), {}),
        ("cppo binary max w_min", LossConfig(mode="cppo", horizon="max", w_min=0.5), {}),
        ("gspo seq-mean-token-mean", LossConfig(mode="gspo", loss_agg_mode="seq-mean-token-mean"), {}),
        ("dppo_topk_kl entropy per-token T", LossConfig(mode="dppo_topk_kl", topk=K, entropy_coef=0.01),
         {"temperature": "per-token"}),
    ]


def _cp_body(rank, world):
    tp, cp = 2, 2
    group, r = tp_groups(world, sizes=(tp,))[tp]
    cp_groups = [dist.new_group([i, i + tp]) for i in range(tp)]   # every rank creates every group
    cp_group, cp_rank = cp_groups[rank % tp], rank // tp
    out = []
    for name, cfg, opts in _cp_configs():
        x_full, x, shard, temp, rollout = _batch(padded(VOCAB, tp), tp, group, r, opts, cfg, segs=CP_SEGS)
        counts = GlobalCounts(num_tokens=int(rollout["loss_mask"].sum()), num_sequences=len(CP_SEGS),
                              max_response_length=L)
        ref_loss, _, ref_grad = _reference(x_full, rollout, cfg, counts, temp, False)
        index, local_cu = partition_index(rollout["cu_seqlens"], cp, cp_rank)
        local = {k: v[index] if isinstance(v, torch.Tensor) and k != "cu_seqlens" else v
                 for k, v in rollout.items()}
        local["cu_seqlens"] = local_cu          # one local segment per chunk
        xs = x[index].clone().requires_grad_(True)
        t_local = temp[index] if isinstance(temp, torch.Tensor) else temp
        loss, _ = vocab_parallel_policy_loss(xs, local, cfg, counts, shard, group, temperature=t_local,
                                             cp_group=cp_group)
        (gx,) = torch.autograd.grad(loss, xs)
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        tag = f"tp={tp} rank={r} cp_rank={cp_rank} [{name}]"
        torch.testing.assert_close(total, ref_loss.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} loss: {m}")
        assert_grad_close(gx, ref_grad[index], shard, f"{tag} grad")
        out.append(name)
    return out


def test_whole_loss_context_parallel_tp2_cp2_equals_unsplit():
    results = run_ranks(_cp_body, 4, timeout=300)
    assert all(res == [name for name, _, _ in _cp_configs()] for res in results)
