"""GPU-only parts (marked gpu; skipped without CUDA). Those needing transformer-engine skip when it is not
importable, those needing 2 GPUs when fewer are visible, so a bare single-GPU PyTorch image runs the rest.

Without transformer-engine (1 GPU; the local layer spec, which takes packed rows as a block-diagonal mask):
- One training step on CUDA (TP 1 PP 1, DDP + the distributed optimizer, `dppo_binary_tv`, 2 packed
  microbatches) equals the same step on the CPU (a spawned rank with CUDA_VISIBLE_DEVICES="", the CPU
  patches on), fp32 and bf16. Every forward gets a CUDA block-diagonal mask and no packed_seq_params.
  fp32: loss rel 1e-5 (abs 1e-6), grad norm rel 1e-5, updated weights atol 2e-6: the cross-layout
  tolerances of tests/megatron/test_step.py (kernel and reduction-order noise). bf16: rel 2e-2 and
  atol 1e-2, test_step's bf16-vs-fp32 bounds (CPU and CUDA bf16 GEMMs round differently). Measured on
  CPU for scale: bf16 vs fp32 moves this step's loss by 0.17% and grad norm by 0.10%; dropping the
  mask (plain causal attention across the packed sequences) moves them by 50% and 15%.
- Dist-checkpoint save / load on CUDA (bf16, distributed optimizer): a fresh actor with other weights
  loads the checkpoint and then holds exactly (torch.equal) the saved parameters, fp32 main parameters,
  Adam moments and steps, and CPU / CUDA / tracker RNG states; its next step equals the saver's next
  step (loss rel 1e-6, fp32 main parameters atol 1e-6: CUDA kernels with atomics need not repeat
  bitwise; whether they did is printed).

With transformer-engine:
- TE spec: logits of 3 sequences packed in one THD row (cu_seqlens) equal each sequence run alone
  through the local spec with the same weights (bf16-free, fp32: atol 2e-3 for TE's fused kernels).
- CP = 2 (needs 2 GPUs, NCCL): one step of `cppo` equals the CP = 1 step (loss rtol 1e-4, grad norm
  rtol 1e-3): the load-balanced split, THD CP attention and the cross-rank CPPO scan together.
- Sequence parallelism at TP 2 (needs 2 GPUs): one step with parallel.sequence_parallel on (also with full
  recompute) equals SP off (loss rtol 1e-4, grad norm rtol 1e-3, updated weights atol 1e-5).
- Recompute on the TE spec (1 GPU): selective and full equal none, same tolerances.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 GPUs (NCCL ranks cannot share one device)")
# looked up, not imported: the parent process never loads transformer-engine's CUDA libraries
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer-engine (not importable)")


def _nccl(rank, world):
    """Swap the harness's gloo world for NCCL (CP attention communicates CUDA tensors)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    torch.cuda.set_device(rank)
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def te_vs_local(rank, world):
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.model import build_model
    from megatron_rl.megatron.packing import pack
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.step import _packed_seq_params

    _nccl(rank, world)
    cfg = model_cfg()
    ps = initialize_parallel(model_cfg=cfg)
    te = build_model(cfg, ps, use_te=True)
    local = build_model(cfg, ps, use_te=False)
    init_params_(local, cfg, ps, seed=1)
    # the TE spec fuses the pre-attention / pre-MLP norms into the linears: map by global init instead
    init_params_(te, cfg, ps, seed=1)
    samples = make_samples(n=3, seed=7)
    mb = pack(samples, [0, 1, 2], 160, cpu_attention_mask=False)
    dev = torch.device("cuda")
    with torch.no_grad():
        psp = _packed_seq_params(mb)
        packed = te(mb.tokens.to(dev), mb.position_ids.to(dev), None, packed_seq_params=psp)[0]
        worst, bounds = 0.0, mb.cu_seqlens.tolist()
        for j, s in enumerate(samples):
            L = s.length
            alone = local(s.tokens[None].to(dev), torch.arange(L, device=dev)[None], None)[0]
            worst = max(worst, float((packed[bounds[j]:bounds[j] + L] - alone).abs().max()))
    return worst


@needs_te
def test_te_spec_thd_packed_equals_local_spec_unpacked():
    assert run_ranks(te_vs_local, 1, timeout=300)[0] < 2e-3


def cp_step(rank, world, cp):
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training

    _nccl(rank, world)
    cfg = model_cfg()
    ps = initialize_parallel(cp=cp, model_cfg=cfg)
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3), init=lambda m: init_params_(m, cfg, ps, seed=1),
                                 use_te=True)
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=160, num_microbatches=2,
                                                   max_response_length=MAX_RESPONSE),
                  policy_loss_fn(cfg, ps, LossConfig(mode="cppo", horizon="sequence")), use_te=True)
    samples = [{k: v.cuda() for k, v in s.items()} for s in make_samples()]
    return actor.train_on_rollout(samples)[0]


@two_gpus
@needs_te
def test_cp2_step_equals_cp1():
    one = run_ranks(cp_step, 1, args=(1,), timeout=300)[0]
    two = run_ranks(cp_step, 2, args=(2,), timeout=300)
    for m in two:
        assert m["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert m["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)


def memory_options_steps(rank, world, tp, variants):
    """One `dppo_binary_tv` step per (recompute, sequence_parallel) variant at TP `tp` on the TE spec, same
    init and data:
    (loss, grad norm, this rank's updated parameters) per variant. The parameters are compared shard by
    shard on the same rank: every variant shards the weights the same way."""
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training, unwrap

    _nccl(rank, world)
    cfg = model_cfg()
    out = {}
    for recompute, sp in variants:
        ps = initialize_parallel(tp=tp, model_cfg=cfg)
        chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3, adam_eps=1e-4),
                                     init=lambda m: init_params_(m, cfg, ps, seed=1),
                                     recompute=recompute, sequence_parallel=sp, use_te=True)
        # 160-token rows: divisible by TP, as sequence parallelism needs (RLConfig checks micro_batch_tokens)
        actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=160, num_microbatches=2,
                                                       max_response_length=MAX_RESPONSE),
                      policy_loss_fn(cfg, ps, LossConfig(mode="dppo_binary_tv")), use_te=True)
        m = actor.train_on_rollout(make_samples())[0]
        params = {n: p.detach().float().cpu().clone() for n, p in unwrap(chunks[0]).named_parameters()}
        out[(recompute, sp)] = (m["loss"], m["grad_norm"], params)
        destroy_parallel()
    return out


def _same_step(results, reference, variant):
    for res in results:
        loss, norm, params = res[variant]
        r_loss, r_norm, r_params = res[reference]
        assert loss == pytest.approx(r_loss, rel=1e-4), variant
        assert norm == pytest.approx(r_norm, rel=1e-3), variant
        for n, p in params.items():
            torch.testing.assert_close(p, r_params[n], rtol=0, atol=1e-5, msg=f"{variant} {n}")


@two_gpus
@needs_te
def test_sequence_parallel_tp2_step_equals_sp_off():
    """parallel.sequence_parallel: the TE spec's norms and the embedding / output layer see the row split
    along the sequence over the 2 TP ranks; loss, grad norm and updated weights must equal SP off."""
    variants = [("none", False), ("none", True), ("full", True)]
    results = run_ranks(memory_options_steps, 2, args=(2, variants), timeout=300)
    _same_step(results, ("none", False), ("none", True))
    _same_step(results, ("none", False), ("full", True))


@needs_te
def test_recompute_on_the_te_spec_equals_none():
    """train.recompute on GPU (TE spec, THD packed rows): selective and full give the step of none
    (tests/megatron/test_recompute.py checks the same on CPU with the local spec, exactly)."""
    variants = [("none", False), ("selective", False), ("full", False)]
    results = run_ranks(memory_options_steps, 1, args=(1, variants), timeout=300)
    _same_step(results, ("none", False), ("selective", False))
    _same_step(results, ("none", False), ("full", False))


# ---- without transformer-engine: the local layer spec on one GPU ----------------------------------------

LOCAL_LR, LOCAL_EPS = 1e-3, 1e-4    # Adam eps 1e-4: see tests/megatron/test_step.py (first-step g / |g|)
# CUDA vs CPU, per bf16: loss rel / abs, grad norm rel, max |updated weight difference| (module docstring)
LOCAL_STEP_TOL = {False: dict(rel=1e-5, abs=1e-6, param_atol=2e-6),
                  True: dict(rel=2e-2, abs=1e-6, param_atol=1e-2)}


def _learner_world(rank, world):
    """Swap the harness's gloo world for the learner's own backend on this rank's GPU
    (parallel.process_group_backend: NCCL for CUDA tensors, gloo for the CPU control tensors)."""
    import torch.distributed as dist

    from megatron_rl.megatron.parallel import process_group_backend

    dist.destroy_process_group()
    torch.cuda.set_device(rank)
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    dist.init_process_group(process_group_backend(), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


@contextlib.contextmanager
def _cpu_only():
    """Ranks spawned inside see no GPU, so they run exactly as on a CPU machine (CPU patches, gloo)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _local_actor(cfg, ps, *, bf16, seed, loss, budget=160):
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.policy import policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training

    optim = OptimConfig(lr=LOCAL_LR, adam_eps=LOCAL_EPS, clip_grad=1.0, bf16=bf16)
    chunks, opt = build_training(cfg, ps, optim, init=lambda m: init_params_(m, cfg, ps, seed=seed), use_te=False)
    return Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=budget, num_microbatches=2,
                                                  max_response_length=MAX_RESPONSE),
                 policy_loss_fn(cfg, ps, loss), use_te=False)


def local_spec_steps(rank, world):
    """Per bf16 in (False, True): one `dppo_binary_tv` step with the local spec on this rank's device (CUDA
    when one is visible): the model's device, loss, grad norm, updated weights, and per forward what
    attention got (the mask's device or None, whether packed_seq_params was passed)."""
    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rl.megatron.training import unwrap

    if torch.cuda.is_available():
        _learner_world(rank, world)
    cfg = model_cfg()
    out = {}
    for bf16 in (False, True):
        ps = initialize_parallel(model_cfg=cfg)
        actor = _local_actor(cfg, ps, bf16=bf16, seed=1, loss=LossConfig(mode="dppo_binary_tv"))
        model = unwrap(actor.chunks[0])
        seen = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((None if args[2] is None else args[2].device.type,
                                                      "packed_seq_params" in kwargs)), with_kwargs=True)
        m = actor.train_on_rollout(make_samples())[0]
        out[bf16] = dict(device=next(model.parameters()).device.type, loss=m["loss"], grad_norm=m["grad_norm"],
                         seen=seen, params={n: p.detach().float().cpu().clone() for n, p in model.named_parameters()})
        destroy_parallel()
    return out


def test_local_spec_step_on_cuda_equals_the_cpu_step():
    """A GPU without transformer-engine trains with the local spec: packed rows as a block-diagonal mask
    on CUDA, and the step of the CPU path (tolerances: module docstring)."""
    gpu = run_ranks(local_spec_steps, 1, timeout=300)[0]
    with _cpu_only():
        cpu = run_ranks(local_spec_steps, 1, timeout=300)[0]
    for bf16, tol in LOCAL_STEP_TOL.items():
        g, c = gpu[bf16], cpu[bf16]
        assert (g["device"], c["device"]) == ("cuda", "cpu"), bf16
        # 2 microbatches, each forward with its mask on the model's device and no THD parameters
        assert g["seen"] == [("cuda", False)] * 2 and c["seen"] == [("cpu", False)] * 2, (g["seen"], c["seen"])
        assert g["loss"] == pytest.approx(c["loss"], rel=tol["rel"], abs=tol["abs"]), (bf16, g["loss"], c["loss"])
        assert g["grad_norm"] == pytest.approx(c["grad_norm"], rel=tol["rel"]), (bf16, g["grad_norm"], c["grad_norm"])
        worst = max(float((g["params"][n] - p).abs().max()) for n, p in c["params"].items())
        print(f"bf16={bf16}: loss {g['loss']:.8g} (cpu {c['loss']:.8g}), grad norm {g['grad_norm']:.8g} "
              f"(cpu {c['grad_norm']:.8g}), max |weight diff| {worst:.3g}")
        assert worst <= tol["param_atol"], (bf16, worst)


def _full_state(actor) -> dict:
    """What a resume must restore, on the host: parameters, fp32 main parameters, Adam state, RNG states."""
    from megatron.core import tensor_parallel

    from megatron_rl.megatron.training import unwrap

    out = {f"param/{n}": p.detach().cpu().clone() for n, p in unwrap(actor.chunks[0]).named_parameters()}
    inner = actor.optimizer.optimizer
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"main/{gi}/{pi}"] = p.detach().cpu().clone()
            for k, v in inner.state[p].items():
                out[f"opt/{gi}/{pi}/{k}"] = v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)
    out["rng/cpu"] = torch.get_rng_state()
    out["rng/cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        if torch.is_tensor(state):
            out[f"rng/tracker/{name}"] = state.cpu().clone()
    return out


def cuda_checkpoint(rank, world, root):
    """Save after one step; a fresh actor with other weights (and reseeded RNGs) loads it; both then take
    the same next step."""
    from megatron.core import tensor_parallel

    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron import checkpoint
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.training import unwrap

    _learner_world(rank, world)
    cfg = model_cfg()
    ps = initialize_parallel(model_cfg=cfg)
    loss = LossConfig(mode="cppo", horizon="sequence")
    first = _local_actor(cfg, ps, bf16=True, seed=2, loss=loss, budget=96)
    first.train_on_rollout(make_samples(n=8, seed=100))
    path = checkpoint.save_checkpoint(root, first)
    saved = _full_state(first)
    ref = first.train_on_rollout(make_samples(n=8, seed=101))[0]
    ref_after = _full_state(first)

    second = _local_actor(cfg, ps, bf16=True, seed=3, loss=loss, budget=96)
    torch.manual_seed(4321)   # nothing of the saver's RNG survives unless the load restores it
    tensor_parallel.model_parallel_cuda_manual_seed(4321)
    before = _full_state(second)
    differed = sorted(k for k in saved if k in before and not torch.equal(saved[k], before[k]))
    checkpoint.load_checkpoint(path, second)
    loaded = _full_state(second)
    mismatched = sorted(k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k]))
    after = second.train_on_rollout(make_samples(n=8, seed=101))[0]
    after_state = _full_state(second)
    mains = [k for k in ref_after if k.startswith("main/")]
    return dict(device=next(unwrap(second.chunks[0]).parameters()).device.type, compared=len(saved),
                extra=sorted(set(loaded) - set(saved)), mismatched=mismatched, differed=differed,
                iteration=second.iteration, loss=after["loss"], ref_loss=ref["loss"],
                main_gap=max(float((after_state[k] - ref_after[k]).abs().max()) for k in mains),
                bitwise=all(torch.equal(after_state[k], ref_after[k]) for k in ref_after if not k.startswith("rng/")))


def test_dist_checkpoint_round_trips_exactly_on_cuda(tmp_path):
    r = run_ranks(cuda_checkpoint, 1, args=(str(tmp_path / "ckpt"),), timeout=300)[0]
    print(f"continued step bitwise equal: {r['bitwise']}, max |main param gap| {r['main_gap']:.3g}")
    assert r["device"] == "cuda"
    assert r["compared"] > 20 and r["extra"] == [] and r["mismatched"] == [], r["mismatched"][:10]
    # not vacuous: the loading actor's weights and RNG differed from the checkpoint's before the load
    assert any(k.startswith("param/") for k in r["differed"]) and "rng/cuda" in r["differed"], r["differed"][:10]
    assert r["iteration"] == 2
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6, abs=1e-9)
    assert r["main_gap"] <= 1e-6, r["main_gap"]
