"""The layer spec: which one is built, what only transformer-engine can run, and how the Actor feeds
packed rows to attention (decided by the spec it is given, never by whether CUDA is there).

- resolve_use_te, with CUDA and transformer_engine each present or absent (torch.cuda.is_available and
  the import lookup importlib.util.find_spec monkeypatched): None picks TE exactly when both are there
  (a bare PyTorch GPU image gets the local spec); True without CUDA or without TE is a ValueError naming
  what to change; False is always the local spec.
- With the local spec, sequence parallelism and context-parallel attention are refused before any model
  exists, naming parallel.sequence_parallel / parallel.context (the Actor refuses CP > 1 too); the TE
  spec accepts both.
- The Actor moves microbatches to its chunks' parameter device (a meta-device model stands in for CUDA).
- One real step and one compute_logprobs on the tiny model (1 gloo rank, local spec on CPU): given
  use_te=False while CUDA is reported present, every forward the model receives carries its row's
  block-diagonal causal mask and no packed_seq_params; given use_te=True while CUDA is reported absent,
  no mask and THD packed_seq_params whose cu_seqlens are the row's segments plus the padding tail. The
  local spec cannot run THD, so a forward pre-hook on the real model records the keyword, then drops it
  so the real schedule runs on.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg

BUDGET = 160


def _ps(tp: int = 1, cp: int = 1):
    """A ParallelState with these sizes and no groups (the checks here read sizes only)."""
    from megatron_rl.megatron.parallel import ParallelState

    return ParallelState(tp=tp, pp=1, cp=cp, dp=1, tp_rank=0, pp_rank=0, cp_rank=0, dp_rank=0, tp_group=None,
                         pp_group=None, cp_group=None, dp_group=None, dp_cp_group=None, pg_collection=None)


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=..., te=...): what torch.cuda.is_available and the transformer_engine lookup report."""
    real_find_spec = importlib.util.find_spec

    def set_machine(cuda: bool, te: bool):
        def find_spec(name, *args, **kwargs):
            if name == "transformer_engine":
                return importlib.machinery.ModuleSpec(name, None) if te else None
            return real_find_spec(name, *args, **kwargs)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return set_machine


@pytest.mark.parametrize("cuda,te,want", [(False, False, False), (False, True, False), (True, False, False),
                                          (True, True, True)])
def test_default_spec_is_te_only_with_cuda_and_transformer_engine(machine, cuda, te, want):
    from megatron_rl.megatron.model import resolve_use_te, transformer_engine_installed

    machine(cuda=cuda, te=te)
    assert transformer_engine_installed() is te
    assert resolve_use_te(None) is want
    assert resolve_use_te(False) is False
    if cuda and te:
        assert resolve_use_te(True) is True


@pytest.mark.parametrize("cuda,te,match", [
    (False, True, "needs CUDA and none is available; pass use_te=False"),
    (False, False, "needs CUDA and none is available; pass use_te=False"),
    (True, False, "transformer_engine is not installed.*install it .*or pass use_te=False"),
])
def test_forcing_te_where_it_cannot_run_names_what_to_change(machine, cuda, te, match):
    from megatron_rl.megatron.model import resolve_use_te

    machine(cuda=cuda, te=te)
    with pytest.raises(ValueError, match=match):
        resolve_use_te(True)


def test_local_spec_refuses_sequence_parallel_and_context_parallel_naming_the_key():
    from megatron_rl.megatron.model import check_layer_spec, check_memory_options

    with pytest.raises(ValueError) as e:
        check_memory_options(_ps(tp=2), False, "none", sequence_parallel=True)
    assert "transformer-engine layer spec" in str(e.value) and "parallel.sequence_parallel: false" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_memory_options(_ps(cp=2), False, "none", sequence_parallel=False)
    msg = str(e.value)
    assert "parallel.context = 2" in msg and "transformer-engine layer spec" in msg
    assert "parallel.context: 1" in msg
    # the TE spec runs both; the local spec everything else (TP, recompute)
    check_memory_options(_ps(tp=2, cp=2), True, "full", sequence_parallel=True)
    check_memory_options(_ps(tp=2), False, "selective", sequence_parallel=False)
    check_layer_spec(True, sequence_parallel=True, cp=4)


def test_actor_refuses_context_parallel_with_the_local_spec():
    from megatron_rl.megatron.step import Actor, StepConfig

    chunk = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="parallel.context: 1"):
        Actor(model_cfg(), _ps(cp=2), [chunk], None, StepConfig(microbatch_tokens=BUDGET), None, use_te=False)
    assert Actor(model_cfg(), _ps(cp=2), [chunk], None, StepConfig(microbatch_tokens=BUDGET), None,
                 use_te=True).use_te


def test_actor_moves_microbatches_to_its_model_device(machine):
    from megatron_rl.megatron.step import Actor, StepConfig

    machine(cuda=False, te=False)
    cfg = StepConfig(microbatch_tokens=BUDGET)
    on_meta = Actor(model_cfg(), _ps(), [torch.nn.Linear(2, 2, device="meta")], None, cfg, None, use_te=False)
    assert on_meta.device.type == "meta"
    mb = on_meta.microbatches(make_samples(n=3))[0]
    moved, kwargs = on_meta._model_inputs(mb)
    assert kwargs == {}
    assert moved.tokens.device.type == moved.attention_mask.device.type == "meta"
    assert mb.tokens.device.type == "cpu"   # the packed original is left where it was
    # a chunk without parameters says nothing: without CUDA the host, and the default spec is local
    bare = Actor(model_cfg(), _ps(), [torch.nn.Identity()], None, cfg, None)
    assert bare.device == torch.device("cpu") and bare.use_te is False


def attention_paths(rank, world):
    """Per use_te: the attention inputs the real model saw in one training step and one compute_logprobs,
    checked against each microbatch's row."""
    from unittest import mock

    from megatron_rl.losses.config import LossConfig
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.packing import causal_block_mask
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.policy import logprob_fn, policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig
    from megatron_rl.megatron.training import OptimConfig, build_training, unwrap

    cfg = model_cfg()
    ps = initialize_parallel(model_cfg=cfg)
    chunks, opt = build_training(cfg, ps, OptimConfig(lr=1e-3), init=lambda m: init_params_(m, cfg, ps, seed=1),
                                 use_te=False)
    seen = []

    def record(module, args, kwargs):
        seen.append((args[2], kwargs.pop("packed_seq_params", None)))   # dropped: the local spec has no THD
        return args, kwargs

    unwrap(chunks[0]).register_forward_pre_hook(record, with_kwargs=True)
    samples = make_samples()
    out = {}
    for use_te in (False, True):
        # CUDA reported the other way round from the spec: the path must follow the spec alone
        with mock.patch.object(torch.cuda, "is_available", lambda: not use_te):
            actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=BUDGET, num_microbatches=2,
                                                           max_response_length=MAX_RESPONSE),
                          policy_loss_fn(cfg, ps, LossConfig(mode="dppo_binary_tv")), use_te=use_te)
            mbs = actor.microbatches(samples)
        assert actor.device.type == "cpu"
        seen.clear()
        metrics = actor.train_minibatch(samples)
        logprobs = actor.compute_logprobs(samples, logprob_fn(cfg, ps))
        assert len(seen) == 2 * len(mbs) == 4, len(seen)   # train, then forward only, same rows in order
        for (mask, psp), mb in zip(seen, mbs + mbs):
            cu = mb.cu_seqlens.tolist()
            if not use_te:
                assert mb.attention_mask is None and psp is None   # built per forward, on the model's device
                assert torch.equal(mask, causal_block_mask(mb.cu_seqlens, BUDGET))
                assert len(cu) > 2   # several sequences share the row: the mask is really block-diagonal
            else:
                assert mb.attention_mask is None and mask is None and psp is not None
                assert psp.qkv_format == "thd"
                want = cu + [BUDGET] if cu[-1] < BUDGET else cu   # the padding tail is its own segment
                assert psp.cu_seqlens_q.tolist() == psp.cu_seqlens_kv.tolist() == want
                assert psp.max_seqlen_q == max(b - a for a, b in zip(want, want[1:]))
        out[use_te] = (metrics["loss"], metrics["grad_norm"], len(logprobs))
    return out


def test_actor_attention_path_follows_the_spec_not_cuda():
    out = run_ranks(attention_paths, 1, timeout=240)[0]
    for use_te, (loss, grad_norm, n) in out.items():
        assert n == len(make_samples()) and grad_norm > 0 and loss == loss, (use_te, loss, grad_norm)
