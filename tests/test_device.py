"""Device-correct by construction, checked on a CPU-only machine.

1. The implicit-device guard (tests/device_guard.py): every tensor factory call that library code makes on
   the per-microbatch paths names its device. Paths run under it, forward AND backward: the whole loss in
   every registered mode and the extra configurations of tests/parallel/test_loss.py (top-K, CPPO fixed /
   p90 / horizons, exact, entropy, KL, per-token and float temperature, bf16, seq_first), packed and padded
   batches, every vocab-parallel function (validation included), packing and the CP split, the CP segment
   fields, the Megatron loss adapter (policy_loss_fn, the Actor's input path with its attention mask and
   its _megatron_loss), the trainer's per-token work (advantages, rollout_to_samples). On the code before this test existed it flagged
   parallel/vocab_parallel.py (the work buffers and per-token stats of the vocabulary pass, the backward's
   buffers, the validation facts, the top-K gather buffer), parallel/context_parallel.py and packing.
2. An accelerator stand-in, the meta device: the whole loss (every config), the vocab-parallel functions
   and the adapter forward AND backward on meta tensors, with validation off (values cannot be read there:
   validation is separable from the math for this reason). A CPU tensor meeting a meta one raises, as it
   would on CUDA; every output and gradient must be on the device. Section 2 says why meta and not fake CUDA.
3. Fake CUDA (`FakeTensorMode`): what does run on fake `device="cuda"` tensors of a CPU-only torch
   (structural validation, the binary / exact divergences, the device policies).
4. The chunk policy per device, results independent of the chunk size, and CPPO's sync-free form.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.device_guard import ImplicitDeviceGuard

from megatron_rl.losses import MODES, GlobalCounts, LossConfig, PolicyInputs, compute_policy_loss
from megatron_rl.parallel import VocabShard, vocab_parallel_policy_loss
from megatron_rl.parallel import vocab_parallel as vp
from tests.parallel import test_loss as tl
from tests.parallel._reference import padded


def test_the_guard_flags_an_implicit_factory_and_passes_an_explicit_one():
    here = __import__("pathlib").Path(__file__).parent
    with ImplicitDeviceGuard(roots=(here,)) as g:
        torch.zeros(3)
        torch.zeros(3, device="cpu")
        t = torch.ones(2, device="cpu")
        torch.as_tensor(t)
        t.new_zeros(3)
        torch.zeros_like(t)
    assert len(g.sites) == 1 and next(iter(g.sites.values())) == "zeros", g.sites
    assert g.calls >= 3


# ---- 1. the guard on every per-microbatch path -------------------------------------------------------


def _whole_loss_cases():
    """Every config of the whole-loss test at tp 1: forward and backward through the vocabulary pass."""
    for name, cfg, opts in tl._configs():
        x_full, x, shard, temp, rollout = tl._batch(padded(tl.VOCAB, 1), 1, None, 0, opts, cfg)
        counts = GlobalCounts(int(rollout["loss_mask"].sum()), len(tl.SEGS), tl.L)
        yield name, cfg, opts, x, shard, temp, rollout, counts


def _run_whole_loss(cfg, opts, x, shard, temp, rollout, counts, inplace=False):
    xs = x.clone().requires_grad_(True)
    seq_first = opts.get("seq_first", False)
    inp = tl._seq_first(xs, 2) if seq_first else xs * 1.0
    loss, metrics = vocab_parallel_policy_loss(inp, rollout, cfg, counts, shard, None, temperature=temp,
                                               seq_first=seq_first, entropy_metric=opts.get("entropy_metric", False),
                                               inplace_backward=inplace and not seq_first, chunk_rows=4)
    loss.backward()
    return loss, metrics, xs.grad


def test_whole_loss_every_mode_names_its_devices():
    cases = list(_whole_loss_cases())           # test data is built outside the guard
    with ImplicitDeviceGuard() as g:
        for name, cfg, opts, x, shard, temp, rollout, counts in cases:
            for inplace in (False, True):
                _run_whole_loss(cfg, opts, x, shard, temp, rollout, counts, inplace)
    assert g.calls > 0
    assert not g.sites, g.report()


def test_padded_batches_and_the_cppo_variants_name_their_devices():
    from tests.losses._gen import random_batch

    gen = torch.Generator().manual_seed(3)
    b, l = 3, 12
    data = random_batch(gen, [l] * b, v=16, k=4)
    padded_kw = {k: (v.reshape(b, l, *v.shape[1:]) if k != "cu_seqlens" else None) for k, v in data.items()}
    padded_kw.pop("cu_seqlens")
    configs = [LossConfig(mode=m, topk=4, **({"tis_cap": 5.0} if m == "cispo" else {})) for m in MODES] + [
        LossConfig(mode="cppo", divergence="topk_kl", topk=4, delta_b_mode="p90", horizon="sequence"),
        LossConfig(mode="cppo", divergence="binary_tv", horizon="max", w_min=0.3),
        LossConfig(mode="cppo", divergence="exact_kl", delta_b_mode="p90", horizon="max"),
    ]
    with ImplicitDeviceGuard() as g:
        for cfg in configs:
            for layout in ("packed", "padded"):
                kw = dict(data) if layout == "packed" else _fields(PolicyInputs.from_padded(**padded_kw))
                lp = kw.pop("logprobs").detach().clone().requires_grad_(True)
                inputs = PolicyInputs(logprobs=lp, **{k: v for k, v in kw.items() if k != "logprobs"})
                loss, _ = compute_policy_loss(cfg, inputs, GlobalCounts.local(inputs, max_response_length=l))
                loss.backward()
    assert not g.sites, g.report()


def test_vocab_parallel_functions_name_their_devices():
    n, v = 9, 300
    shard = VocabShard(0, padded(v, 1), v)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for temp in (1.0, 0.7, torch.linspace(0.6, 1.2, n)):
            x = torch.randn(n, shard.width, generator=gen).to(dtype)
            ids = torch.randint(0, v, (n, 3), generator=gen)
            cases.append((x, ids, temp))
    with ImplicitDeviceGuard() as g:
        for x, ids, temp in cases:
            for chunk_rows in (None, 2):
                xs = x.clone().requires_grad_(True)
                st = vp.vocab_parallel_token_stats(xs, ids, shard, None, temperature=temp, entropy=True,
                                                   chunk_rows=chunk_rows)
                (st.logprobs.sum() + st.entropy.sum()).backward()
                xs = x.clone().requires_grad_(True)
                vp.vocab_parallel_logprobs(xs, ids[:, 0], shard, None, temperature=temp).sum().backward()
                xs = x.clone().requires_grad_(True)
                vp.vocab_parallel_entropy(xs, shard, None, temperature=temp).sum().backward()
                vp.vocab_parallel_topk(x, 5, shard, None, temperature=temp, chunk_rows=chunk_rows)
    assert not g.sites, g.report()


def test_packing_the_adapter_and_the_trainer_work_name_their_devices():
    from megatron_rl.megatron.packing import pack_batch, split_for_cp
    from megatron_rl.parallel.context_parallel import cp_segment_fields, partition_index
    from megatron_rl.trainer.advantages import AdvantageConfig, compute_advantages

    samples = _samples()
    with ImplicitDeviceGuard() as g:
        for mask in (True, False):
            mbs = pack_batch(samples, 64, cpu_attention_mask=mask, pad_multiple=4)
        split_for_cp(mbs[0], 2, 1)
        cu = torch.tensor([0, 8, 20], dtype=torch.int64)
        index, local_cu = partition_index(cu, 2, 0)
        d = torch.rand(index.numel(), dtype=torch.float64)
        for cfg in (LossConfig(mode="cppo"), LossConfig(mode="cppo", delta_b_mode="p90")):
            cp_segment_fields(d, d > 0.3, local_cu, None, cfg, 16, log_ratio=d)
        compute_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), AdvantageConfig())
    assert not g.sites, g.report()


def _fields(inputs: PolicyInputs) -> dict:
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}


def _samples(topk: int = 3):
    from megatron_rl.megatron.packing import TrainingSample

    gen = torch.Generator().manual_seed(1)
    out = []
    for length in (9, 14, 7):
        m = torch.zeros(length)
        m[3:] = 1.0
        out.append(TrainingSample(tokens=torch.randint(0, 50, (length,), generator=gen), loss_mask=m,
                                  advantages=torch.full((length,), 0.5),
                                  rollout_logprobs=-torch.rand(length, generator=gen),
                                  rollout_topk_ids=torch.randint(0, 50, (length, topk), generator=gen),
                                  rollout_topk_logprobs=-torch.rand(length, topk, generator=gen) - 1.0))
    return out


def _tiny_model_cfg(vocab: int = 50):
    from tests.megatron.common import model_cfg

    return model_cfg(vocab_size=vocab)


def _single_rank_state():
    """A TP = PP = CP = DP = 1 ParallelState (the loss adapter reads only sizes and ranks at that layout)."""
    from megatron_rl.megatron.parallel import ParallelState

    return ParallelState(tp=1, pp=1, cp=1, dp=1, tp_rank=0, pp_rank=0, cp_rank=0, dp_rank=0, tp_group=None,
                         pp_group=None, cp_group=None, dp_group=None, dp_cp_group=None, pg_collection=None)


def _adapter_case(device: str, mode: str = "cppo"):
    """(loss_fn, microbatch on `device`, counts, logits leaf) for the Megatron loss adapter."""
    from megatron_rl.megatron.packing import pack_batch
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import StepCounts

    cfg = _tiny_model_cfg()
    ps = _single_rank_state()
    loss_cfg = LossConfig(mode=mode, divergence="topk_tv", topk=3) if mode == "cppo" else LossConfig(mode=mode, topk=3)
    fn = policy_loss_fn(cfg, ps, loss_cfg, temperature=0.7, inplace_backward=False, validate=device == "cpu")
    mb = pack_batch(_samples(), 48, cpu_attention_mask=True)[0].to(device)
    width = cfg.padded_vocab_size(1)
    logits = torch.randn(48, width, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_(True)
    counts = StepCounts(torch.tensor(27, device=device), torch.tensor(3, device=device), 16)
    return fn, mb, counts, logits


def _actor(loss_fn, device="cpu"):
    """A real Actor around a one-layer stand-in chunk (its adapter and input path need no model)."""
    from megatron_rl.megatron.step import Actor, StepConfig

    chunk = torch.nn.Linear(2, 2, device=device)
    return Actor(_tiny_model_cfg(), _single_rank_state(), [chunk], None, StepConfig(microbatch_tokens=48),
                 loss_fn, use_te=False)


def test_the_megatron_loss_adapter_names_its_devices():
    from megatron_rl.rollout.types import Rollout, Sample
    from megatron_rl.trainer.learner import rollout_to_samples

    cases = [_adapter_case("cpu", m) for m in ("cppo", "dppo_binary_kl", "dppo_topk_tv")]
    gen = torch.Generator().manual_seed(6)
    rollout = Rollout([Sample(torch.randint(0, 50, (4,), generator=gen), torch.randint(0, 50, (6,), generator=gen),
                              -torch.rand(6, generator=gen), "stop", 0, 0, i,
                              topk_ids=torch.randint(0, 50, (6, 3), generator=gen),
                              topk_logprobs=-torch.rand(6, 3, generator=gen)) for i in range(2)], topk=3)
    with ImplicitDeviceGuard() as g:
        for fn, mb, counts, logits in cases:
            loss, metrics = fn(logits * 1.0, mb, counts)          # policy_loss_fn alone
            loss.backward()
            actor = _actor(fn)                                     # the Actor's input path and adapter
            actor._counts, actor._num_microbatches = counts, 2
            moved, kwargs = actor._model_inputs(mb)
            assert moved.attention_mask is not None and kwargs == {}
            scaled, report = actor._megatron_loss(moved, (logits * 1.0)[None])
            scaled.backward()
        samples = rollout_to_samples(rollout, torch.tensor([0.5, -0.5]), topk=3)
        actor.microbatches(samples)
    assert g.backward_calls > 0 and not g.sites, g.report()


# ---- 2. an accelerator stand-in: the meta device, forward AND backward ---------------------------------
#
# Measured on this CPU-only torch: FakeTensorMode's CUDA tensors fail ("not linked with support for cuda
# devices") on Python indexing (x[a:b]), copy_, scatter_add_, index_add and expand, all of which need a
# CUDA device guard, and autograd on them aborts; so they reach only the code without indexing (section 3).
# The meta device has a no-op guard, supports autograd, and mixes with the CPU exactly as CUDA does: a
# binary op, cat, where or out= with a non-scalar CPU tensor raises; a CPU index tensor, a 0-dim CPU
# scalar and copy_ from the CPU are accepted (CUDA accepts those too). It is also not "cpu", so the
# vocabulary pass takes the accelerator chunk policy and CPPO its sync-free general form.

META = torch.device("meta")


def _on(device, t):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def test_whole_loss_every_mode_runs_on_an_accelerator_stand_in():
    for name, cfg, opts, x, shard, temp, rollout, counts in _whole_loss_cases():
        xs = x.to(META).requires_grad_(True)
        seq_first = opts.get("seq_first", False)
        inp = xs.view(2, -1, xs.shape[-1]).transpose(0, 1).contiguous() if seq_first else xs * 1.0
        meta_counts = GlobalCounts(torch.tensor(float(counts.num_tokens), device=META),
                                   torch.tensor(float(counts.num_sequences), device=META), counts.max_response_length)
        loss, metrics = vocab_parallel_policy_loss(
            inp, {k: _on(META, v) for k, v in rollout.items()}, cfg, meta_counts, shard, None,
            temperature=_on(META, temp), seq_first=seq_first, entropy_metric=opts.get("entropy_metric", False),
            validate=False)
        loss.backward()
        assert loss.device == META and xs.grad.device == META and xs.grad.shape == xs.shape, name
        off = {k: v.device for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.device != META}
        assert not off, f"[{name}] metrics off the device: {off}"


def test_vocab_parallel_functions_run_on_an_accelerator_stand_in():
    n, v = 9, 300
    shard = VocabShard(0, padded(v, 1), v)
    for dtype in (torch.float32, torch.bfloat16):
        for temp in (1.0, 0.7, torch.linspace(0.6, 1.2, n, device=META)):
            x = torch.empty(n, shard.width, dtype=dtype, device=META, requires_grad=True)
            ids = torch.zeros(n, 3, dtype=torch.int64, device=META)
            st = vp.vocab_parallel_token_stats(x, ids, shard, None, temperature=temp, entropy=True, validate=False)
            (st.logprobs.sum() + st.entropy.sum()).backward()
            assert {st.logprobs.device, st.entropy.device, st.lse.device, x.grad.device} == {META}
            assert x.grad.dtype == dtype
            lp, top_ids = vp.vocab_parallel_topk(x.detach(), 5, shard, None, temperature=temp, validate=False)
            assert lp.device == META and top_ids.device == META and top_ids.shape == (n, 5)


def test_the_megatron_loss_adapter_runs_on_an_accelerator_stand_in():
    for mode in ("cppo", "dppo_binary_kl", "dppo_topk_tv"):
        fn, mb, counts, logits = _adapter_case("meta", mode)
        loss, metrics = fn(logits * 1.0, mb, counts)
        loss.backward()
        assert loss.device == META and logits.grad.device == META
        assert all(v.device == META for v in metrics.values() if isinstance(v, torch.Tensor)), metrics
        # the Actor: a host microbatch moves to the model's device with its mask built there
        host_mb = _adapter_case("cpu", mode)[1]
        actor = _actor(fn, device=META)
        actor._counts, actor._num_microbatches = counts, 2
        moved, _ = actor._model_inputs(host_mb)
        assert {moved.tokens.device, moved.attention_mask.device, moved.fields["loss_mask"].device} == {META}
        scaled, report = actor._megatron_loss(moved, logits.detach().clone().requires_grad_(True)[None])
        scaled.backward()
        assert scaled.device == META


# ---- 3. fake CUDA (FakeTensorMode): what runs there on a CPU-only torch --------------------------------


def test_fake_cuda_structure_validation_divergences_and_device_policies():
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

    from megatron_rl.losses import DIVERGENCES
    from tests.losses._gen import random_batch

    data = random_batch(torch.Generator().manual_seed(3), [12, 7, 9], v=16, k=4, requires_grad=False)
    with FakeTensorMode(), torch.no_grad():
        cuda = {k: torch.empty(v.shape, dtype=v.dtype, device="cuda") for k, v in data.items()}
        inputs = PolicyInputs(**cuda, check_values=False)       # structural checks only: no value reads
        assert not inputs.values_checked and inputs.cu_seqlens.device.type == "cuda"
        for name in ("binary_tv", "binary_kl", "exact_tv", "exact_kl"):
            assert all(t.device.type == "cuda" for t in DIVERGENCES[name](inputs, inputs.rollout_logprobs)
                       if isinstance(t, torch.Tensor)), name
        x = torch.empty(16, 151936, dtype=torch.bfloat16, device="cuda")
        assert vp._temp_rows(0.7, 16, x.device).device.type == "cuda"
        assert vp._temp_rows(torch.full((16,), 0.7), 16, x.device).device.type == "cuda"  # host T is moved
        assert vp._rows(x.shape[1], None, 1, x.device) == vp.chunk_bytes("cuda") // (4 * 151936)
        assert vp._control_device(None, x).type == "cpu"
        try:   # the mismatch FakeTensorMode exists to catch: what every implicit-device factory would cause
            x.float() - torch.zeros(16, 151936)
            raised = False
        except FakeTensorDeviceMismatchError:
            raised = True
        assert raised


# ---- 4. the chunk policy per device, and results that never depend on it -------------------------------


def test_chunk_policy_per_device():
    w = 151936
    assert vp.chunk_bytes("cpu") == 2**20 and vp.chunk_bytes("cuda") == 2**28 and vp.chunk_bytes("meta") == 2**28
    assert vp._rows(w, None, 1, torch.device("cpu")) == 1                 # cache-sized: one row of 152k
    assert vp._rows(w, None, 1, torch.device("cuda")) == 441              # 256 MiB / (4 B * 151936)
    assert vp._rows(w, None, 2, torch.device("cuda")) == 220              # entropy: split over two buffers
    assert vp._rows(w, 7, 2, torch.device("cuda")) == 3                   # an explicit chunk_rows wins


def test_chunking_never_changes_results():
    """Values and gradients are bit-identical for every chunk size: one row per chunk, ragged chunks, one
    chunk of everything, the CPU default and what the accelerator budget would pick."""
    n, v = 37, 1000
    shard = VocabShard(0, padded(v, 1), v)
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        x0 = (3 * torch.randn(n, shard.width, generator=gen)).to(dtype)
        ids = torch.randint(0, v, (n, 4), generator=gen)
        g_lp, g_ent = torch.randn(n, 4, generator=gen), torch.randn(n, generator=gen)
        for temp in (1.0, 0.7):
            results = {}
            for rows in (None, 1, 5, 16, n - 1, n, vp._rows(shard.width, None, 1, torch.device("cuda"))):
                x = x0.clone().requires_grad_(True)
                st = vp.vocab_parallel_token_stats(x, ids, shard, None, temperature=temp, entropy=True,
                                                   chunk_rows=rows)
                torch.autograd.backward([st.logprobs, st.entropy], [g_lp, g_ent])
                top = vp.vocab_parallel_topk(x0, 6, shard, None, temperature=temp, chunk_rows=rows)
                results[rows] = (st.logprobs, st.entropy, st.lse, x.grad, *top)
            ref = results[1]
            for rows, got in results.items():
                for a, b in zip(got, ref):
                    assert torch.equal(a, b), f"{dtype} T={temp} chunk_rows={rows} differs from chunk_rows=1"


def test_cppo_general_form_equals_the_cpu_shortcuts(monkeypatch):
    """The sync-free formulation accelerators run (packed scan, infinite-budget handling) gives the CPU
    shortcuts' mask exactly, and their scans to fp64 rounding: padded rows, packed rows, delta_b = inf."""
    from megatron_rl.losses import cppo as cppo_module

    gen = torch.Generator().manual_seed(5)
    for cu in ([0, 20, 40, 60], [0, 13, 13, 40, 61]):
        cu = torch.tensor(cu)
        n = int(cu[-1])
        d = torch.rand(n, generator=gen, dtype=torch.float64) * 0.05
        m = torch.rand(n, generator=gen) < 0.8
        for kw in (dict(delta_b_mode="fixed", delta_b=0.015), dict(delta_b_mode="p90"),
                   dict(seg_delta_b=torch.tensor([0.01, float("inf"), 0.02, 0.03][: cu.numel() - 1],
                                                 dtype=torch.float64))):
            out = {}
            for host in (True, False):
                monkeypatch.setattr(cppo_module, "_host_reads", lambda dev, h=host: h)
                out[host] = cppo_module.cppo_mask(d, m, cu, delta=0.03, w_min=0.5, max_response_length=25, **kw)
            a, b = out[True], out[False]
            assert torch.equal(a.inside, b.inside) and torch.equal(a.budget_only, b.budget_only), kw
            torch.testing.assert_close(a.threshold, b.threshold, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(a.z_sum, b.z_sum, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(a.delta_b, b.delta_b, rtol=0, atol=0)


def test_validation_facts_live_where_the_group_can_reduce_them(monkeypatch):
    """The [tp, 7] validation facts: on the host for a group with a CPU backend (gloo, or the
    cpu:gloo,cuda:nccl groups megatron_rl creates on GPU), on the logits' device for a device-only group
    (a plain NCCL group rejects CPU tensors). A real gloo group is used in tests/parallel."""
    x = torch.empty(2, 4, device=META)
    for backend, want in (("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "meta")):
        monkeypatch.setattr(vp.dist, "get_backend", lambda group, b=backend: torch.distributed.Backend(b))
        assert vp._control_device(object(), x).type == want, backend
        assert vp._control_device(object(), torch.empty(2, 4, device="cpu")).type == "cpu", backend
    assert vp._control_device(None, x).type == "cpu"
