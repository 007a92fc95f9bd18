"""GPU-only parts (marked gpu; skipped without CUDA): the transformer-engine layer spec with THD packed
sequences, and context-parallel attention inside a full training step.

- TE spec: logits of 3 sequences packed in one THD row (cu_seqlens) equal each sequence run alone
  through the local spec with the same weights (bf16-free, fp32: atol 2e-3 for TE's fused kernels).
- CP = 2 (needs 2 GPUs, NCCL): one step of `cppo` equals the CP = 1 step (loss rtol 1e-4, grad norm
  rtol 1e-3): the load-balanced split, THD CP attention and the cross-rank CPPO scan together.
- Sequence parallelism at TP 2 (needs 2 GPUs): one step with parallel.sequence_parallel on (also with full
  recompute) equals SP off (loss rtol 1e-4, grad norm rtol 1e-3, updated weights atol 1e-5).
- Recompute on the TE spec (1 GPU): selective and full equal none, same tolerances.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

pytestmark = pytest.mark.gpu


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
            L = s["tokens"].numel()
            alone = local(s["tokens"][None].to(dev), torch.arange(L, device=dev)[None], None)[0]
            worst = max(worst, float((packed[bounds[j]:bounds[j] + L] - alone).abs().max()))
    return worst


def test_te_spec_thd_packed_equals_local_spec_unpacked():
    pytest.importorskip("transformer_engine")
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
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3), init=lambda m: init_params_(m, cfg, ps, seed=1))
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=160, num_microbatches=2,
                                                   max_response_length=MAX_RESPONSE),
                  policy_loss_fn(cfg, ps, LossConfig(mode="cppo", horizon="sequence")))
    samples = [{k: v.cuda() for k, v in s.items()} for s in make_samples()]
    return actor.train_on_rollout(samples)[0]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="context-parallel attention needs 2 GPUs")
def test_cp2_step_equals_cp1():
    pytest.importorskip("transformer_engine")
    one = run_ranks(cp_step, 1, args=(1,), timeout=300)[0]
    two = run_ranks(cp_step, 2, args=(2,), timeout=300)
    for m in two:
        assert m["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert m["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)


def memory_options_steps(rank, world, tp, variants):
    """One `dppo_binary_tv` step per (recompute, sequence_parallel) variant at TP `tp`, same init and data:
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
                                     recompute=recompute, sequence_parallel=sp)
        # 160-token rows: divisible by TP, as sequence parallelism needs (RLConfig checks micro_batch_tokens)
        actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=160, num_microbatches=2,
                                                       max_response_length=MAX_RESPONSE),
                      policy_loss_fn(cfg, ps, LossConfig(mode="dppo_binary_tv")))
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


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="sequence parallelism at TP 2 needs 2 GPUs (NCCL ranks cannot share one device)")
def test_sequence_parallel_tp2_step_equals_sp_off():
    """parallel.sequence_parallel: the TE spec's norms and the embedding / output layer see the row split
    along the sequence over the 2 TP ranks; loss, grad norm and updated weights must equal SP off."""
    pytest.importorskip("transformer_engine")
    variants = [("none", False), ("none", True), ("full", True)]
    results = run_ranks(memory_options_steps, 2, args=(2, variants), timeout=300)
    _same_step(results, ("none", False), ("none", True))
    _same_step(results, ("none", False), ("full", True))


def test_recompute_on_the_te_spec_equals_none():
    """train.recompute on GPU (TE spec, THD packed rows): selective and full give the step of none
    (tests/megatron/test_recompute.py checks the same on CPU with the local spec, exactly)."""
    pytest.importorskip("transformer_engine")
    variants = [("none", False), ("selective", False), ("full", False)]
    results = run_ranks(memory_options_steps, 1, args=(1, variants), timeout=300)
    _same_step(results, ("none", False), ("selective", False))
    _same_step(results, ("none", False), ("full", False))
