"""Vocab-parallel primitives at tp in {1, 2, 4} against the unsharded single-process reference (gloo).

One 4-rank launch runs every case (process start-up dominates); each rank checks its own shard, and the
test also checks that the expected number of checks ran on every rank (nothing silently skipped).
Tolerances: see tests/parallel/_reference.py. The same for the bf16 cases, against the fp32 reference
log_softmax(float32(logits) / T) of the same bf16 logits upcast: values (log p of the target, at ids,
entropy, lse, top-K) rtol 1e-5 / atol 1e-6, i.e. fp32 roundoff (a division done in bf16 is ~1e-1 off);
gradients (returned in bf16) within one bf16 ulp of the fp32 reference gradient rounded to bf16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.parallel import (VocabShard, vocab_parallel_entropy, vocab_parallel_logprobs,
                                  vocab_parallel_logprobs_at, vocab_parallel_token_stats, vocab_parallel_topk)
from tests.multirank import run_ranks
from tests.parallel._reference import (ATOL, RTOL, assert_grad_close, boundary_ids, full_logits, padded,
                                       ref_entropy, ref_logp, shard_of, tp_groups)

# (vocab, tokens, K, dtype, temperature, chunk_rows, leading shape); temperature: a float, "per-token"
# (a tensor of distinct T), or ("tensor", T): the float T as a tensor of the leading shape
CASES = [
    (1000, 13, 6, torch.float32, 1.0, None, None),     # tp=4: last shard partly padding
    (300, 9, 5, torch.float32, 0.7, 4, None),          # tp=4: rank 3's shard is ALL padding
    (1000, 12, 4, torch.bfloat16, "per-token", 5, (3, 4)),
    (257, 7, 3, torch.float32, 1.3, 1, (7,)),          # chunk of one token
    # bf16 at a float / tensor T: z = float32(x) / T divided in fp32, never bf16(x / T)
    (1000, 12, 4, torch.bfloat16, 0.7, 5, (3, 4)),
    (1000, 12, 4, torch.bfloat16, ("tensor", 0.7), 1, None),
    (1000, 12, 4, torch.bfloat16, 1.0, 2, None),
    (1000, 12, 4, torch.bfloat16, ("tensor", 1.0), None, (12,)),
]


def _temperature(spec, lead):
    if spec == "per-token":
        return torch.linspace(0.6, 1.4, int(torch.tensor(lead).prod())).view(lead)
    if isinstance(spec, tuple):
        return torch.full(lead, spec[1])
    return spec


def _grad_ref(x_full, vocab, temp, fn):
    xr = x_full.float().requires_grad_(True)
    out = fn(ref_logp(xr, vocab, temp))
    return out, xr


def _check_case(tp, group, r, case_idx, case, use_none_group):
    vocab, n, k, dtype, tspec, chunk, lead = case
    lead = lead or (n,)
    vpad = padded(vocab, tp)
    x_full = full_logits(n, vocab, vpad, seed=case_idx, dtype=dtype).view(*lead, vpad)
    temp = _temperature(tspec, lead)
    ids = boundary_ids(n, k, vocab, vpad, seed=100 + case_idx).view(*lead, k)
    target = ids[..., 1].clone()
    x, shard = shard_of(x_full, vocab, tp, r)
    grp = None if use_none_group else group
    g = torch.Generator().manual_seed(7 + case_idx)
    w_ids = torch.randn(*lead, k, generator=g)
    w_tgt = torch.randn(*lead, generator=g)
    w_ent = torch.randn(*lead, generator=g)
    checks = 0
    kw = dict(temperature=temp, chunk_rows=chunk)
    tag = f"tp={tp} rank={r} case={case_idx}"

    def leaf():
        return x.clone().requires_grad_(True)

    # 1. log-prob of the target token
    xs = leaf()
    lp = vocab_parallel_logprobs(xs, target, shard, grp, **kw)
    (gx,) = torch.autograd.grad((lp * w_tgt).sum(), xs)
    ref, xr = _grad_ref(x_full, vocab, temp, lambda L: L.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(lp, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} target logp: {m}")
    (gr,) = torch.autograd.grad((ref * w_tgt).sum(), xr)
    assert_grad_close(gx, gr, shard, f"{tag} target logp grad")
    checks += 2

    # 2. log-probs at ids [*, K] (boundaries, duplicates)
    xs = leaf()
    lpk = vocab_parallel_logprobs_at(xs, ids, shard, grp, **kw)
    (gx,) = torch.autograd.grad((lpk * w_ids).sum(), xs)
    ref, xr = _grad_ref(x_full, vocab, temp, lambda L: L.gather(-1, ids))
    torch.testing.assert_close(lpk, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} logp at ids: {m}")
    (gr,) = torch.autograd.grad((ref * w_ids).sum(), xr)
    assert_grad_close(gx, gr, shard, f"{tag} logp-at-ids grad")
    checks += 2

    # 3. entropy
    xs = leaf()
    ent = vocab_parallel_entropy(xs, shard, grp, **kw)
    (gx,) = torch.autograd.grad((ent * w_ent).sum(), xs)
    ref, xr = _grad_ref(x_full, vocab, temp, ref_entropy)
    torch.testing.assert_close(ent, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} entropy: {m}")
    (gr,) = torch.autograd.grad((ref * w_ent).sum(), xr)
    assert_grad_close(gx, gr, shard, f"{tag} entropy grad")
    checks += 2

    # 4. fused: ids + entropy in one pass, Megatron-style in-place backward on a non-leaf
    for inplace in (False, True):
        base = leaf()
        xs = base * 1 if inplace else base          # in-place needs logits nobody else reads
        before = xs.detach().clone()
        st = vocab_parallel_token_stats(xs, ids, shard, grp, entropy=True, inplace_backward=inplace, **kw)
        (gx,) = torch.autograd.grad((st.logprobs * w_ids).sum() + (st.entropy * w_ent).sum(), base)
        ref, xr = _grad_ref(x_full, vocab, temp,
                            lambda L: ((L.gather(-1, ids) * w_ids).sum() + (ref_entropy(L) * w_ent).sum(),
                                       L.gather(-1, ids), ref_entropy(L), torch.logsumexp(
                                           L.new_zeros(()) + x_full[..., :vocab].float() /
                                           (temp.unsqueeze(-1) if isinstance(temp, torch.Tensor) else temp),
                                           dim=-1)))
        torch.testing.assert_close(st.logprobs, ref[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} fused logp: {m}")
        torch.testing.assert_close(st.entropy, ref[2], rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} fused H: {m}")
        torch.testing.assert_close(st.lse, ref[3], rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} fused lse: {m}")
        (gr,) = torch.autograd.grad(ref[0], xr)
        assert_grad_close(gx, gr, shard, f"{tag} fused grad inplace={inplace}")
        if not inplace:
            assert torch.equal(xs.detach(), before), f"{tag}: the caller's logits were modified"
        checks += 5

    # 5. distributed top-K: padding (logit 60, above everything) never chosen; values exact
    for kk in (1, 4, 20):
        vals, top_ids = vocab_parallel_topk(x, kk, shard, grp, **kw)
        ref = ref_logp(x_full, vocab, temp)
        rv, ri = ref.topk(kk, dim=-1)
        assert (top_ids < vocab).all() and (top_ids >= 0).all(), f"{tag}: top-K returned a padding id"
        assert (top_ids.sort(-1).values.diff(dim=-1) != 0).all(), f"{tag}: top-K repeated an id"
        torch.testing.assert_close(vals, rv, rtol=RTOL, atol=ATOL, msg=lambda m: f"{tag} top-{kk} values: {m}")
        torch.testing.assert_close(ref.gather(-1, top_ids), vals, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{tag} top-{kk} ids: {m}")
        distinct = dtype == torch.float32 and tspec != "per-token"
        if distinct:   # fp32 random logits have no ties except the uniform row 1
            rows = torch.arange(vals.reshape(-1, kk).shape[0]) != 1
            assert torch.equal(top_ids.reshape(-1, kk)[rows], ri.reshape(-1, kk)[rows]), f"{tag}: top-{kk} ids"
        checks += 1
    assert torch.equal(x, x_full[..., shard.start:shard.end]), f"{tag}: top-K modified the caller's logits"
    return checks


def _body(rank, world):
    groups = tp_groups(world)
    total = 0
    for tp, (group, r) in sorted(groups.items()):
        for i, case in enumerate(CASES):
            total += _check_case(tp, group, r, i, case, use_none_group=False)
    # tp = 1 without any process group at all (group=None: no collectives)
    total += _check_case(1, None, 0, 0, CASES[0], use_none_group=True)
    return total


def test_primitives_match_single_process_tp_1_2_4():
    counts = run_ranks(_body, 4, timeout=240)
    per_case = 2 + 2 + 2 + 10 + 3
    assert counts == [per_case * (3 * len(CASES) + 1)] * 4


# ---------------------------------------------------------------------------------------------
# bad arguments: the same ValueError on every rank, no rank left in a collective


def _errors_body(rank, world):
    vocab, n = 1000, 5
    vpad = padded(vocab, world)
    x_full = full_logits(n, vocab, vpad, seed=3)
    x, shard = shard_of(x_full, vocab, world, rank)
    ids = torch.randint(0, vocab, (n, 4), generator=torch.Generator().manual_seed(0))
    msgs = {}

    def expect(name, fn, needle):
        try:
            fn()
        except ValueError as e:
            assert needle in str(e), f"{name}: {e}"
            msgs[name] = str(e)
            return
        raise AssertionError(f"{name}: no error on rank {rank}")

    bad = ids.clone()
    bad[2, 1] = vocab                      # a padding id: outside the vocabulary
    expect("padding id", lambda: vocab_parallel_logprobs_at(x, bad, shard, dist.group.WORLD), "`ids`/`target`")
    neg = ids[:, 0].clone()
    if rank == 1:
        neg[0] = -1                        # only one rank sees it
    expect("negative id on one rank", lambda: vocab_parallel_logprobs(x, neg, shard, dist.group.WORLD),
           "TP rank(s) [1]")
    narrow = x[:, :-1] if rank == world - 1 else x   # last dim disagrees with the stated range on one rank
    expect("width", lambda: vocab_parallel_token_stats(narrow, ids, shard, dist.group.WORLD, entropy=True),
           "`logits` last dimension")
    expect("width topk", lambda: vocab_parallel_topk(narrow, 3, shard, dist.group.WORLD), "`logits` last dimension")
    wrong = VocabShard(shard.start + (1 if rank == 2 else 0), shard.end, vocab)
    expect("range", lambda: vocab_parallel_entropy(x, wrong, dist.group.WORLD), "`logits` last dimension")
    fewer = x[:-1] if rank == 0 else x      # ranks disagree on the token count
    expect("tokens", lambda: vocab_parallel_entropy(fewer, shard, dist.group.WORLD), "disagree")
    expect("temperature", lambda: vocab_parallel_logprobs(x, ids[:, 0], shard, dist.group.WORLD,
                                                          temperature=0.0), "`temperature`")
    expect("k", lambda: vocab_parallel_topk(x, vocab + 1, shard, dist.group.WORLD), "`k`")
    # the group is still in step: a normal call afterwards works and agrees
    lp = vocab_parallel_logprobs(x, ids[:, 0], shard, dist.group.WORLD)
    torch.testing.assert_close(lp, ref_logp(x_full, vocab, 1.0).gather(1, ids[:, :1]).squeeze(1),
                               rtol=RTOL, atol=ATOL)
    return msgs


def test_bad_arguments_raise_on_every_rank():
    msgs = run_ranks(_errors_body, 4, timeout=120)
    assert len(msgs[0]) == 8
    assert all(m == msgs[0] for m in msgs), "ranks raised different errors"
