"""The learner side of the loop: build the Megatron actor at the configured layout, turn a scored rollout
into per-token training samples, and stream the learner's weights out in HF layout (for the engine sync
and the final export). The loop (loop.py) calls these; megatron.core itself is reached only through
megatron_rl.megatron.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_rl.convert import read_metadata
from megatron_rl.megatron.hf_checkpoint import iter_hf_tensors, load_weights
from megatron_rl.megatron.parallel import ParallelState, initialize_parallel, process_group_backend
from megatron_rl.megatron.policy import logprob_fn, policy_loss_fn
from megatron_rl.megatron.step import Actor, StepConfig
from megatron_rl.megatron.training import OptimConfig, build_training, unwrap
from megatron_rl.model_config import ModelConfig
from megatron_rl.rollout.mismatch import ProbeCheck, compare_probe
from megatron_rl.rollout.types import Rollout
from megatron_rl.trainer.config import RLConfig

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MEGATRON_RL_TIMEOUT_MIN", "30")))


def init_world() -> tuple[int, int]:
    """torch.distributed from torchrun's environment, or a world of one. Returns (rank, world_size).

    Collectives time out (MEGATRON_RL_TIMEOUT_MIN, default 30) so a dead rank cannot hang the others
    forever; the timeout error names the collective and the rank that raised it."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(process_group_backend(), timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Learner:
    cfg: RLConfig
    model_cfg: ModelConfig
    ps: ParallelState
    actor: Actor
    log_rank: int           # the global rank holding the last stage's tp0/dp0/cp0 results
    reference: Optional[Actor] = None   # frozen initial policy, only when loss.kl_coef > 0

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_last_stage


def build_learner(cfg: RLConfig, checkpoint_dir: str | Path) -> Learner:
    """Model + distributed optimizer + actor at the config's layout, weights from `checkpoint_dir`
    (a converted Megatron checkpoint; resuming from a training checkpoint happens afterwards). The caller
    checked the hardware (RLConfig.check_hardware) before converting anything; the model builder refuses
    what its layer spec cannot run."""
    model_cfg, _ = read_metadata(checkpoint_dir)
    cfg.check_layout(model_cfg, dist.get_world_size())
    p = cfg.parallel
    ps = initialize_parallel(tp=p.tensor, pp=p.pipeline, cp=p.context, seed=cfg.train.seed, model_cfg=model_cfg)
    t = cfg.train
    optim = OptimConfig(lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                        clip_grad=t.clip_grad, bf16=cfg.model.dtype == "bfloat16")
    from megatron_rl.megatron.model import build_model, resolve_use_te

    # the layer spec, decided once here: the actor, the reference model and how both take packed rows
    # (THD for transformer-engine, block-diagonal masks for the local spec) all follow it
    use_te = resolve_use_te(None)
    chunks, optimizer = build_training(model_cfg, ps, optim, init=lambda m: load_weights(m, checkpoint_dir),
                                       recompute=t.recompute, sequence_parallel=p.sequence_parallel,
                                       use_te=use_te)
    step_cfg = StepConfig(microbatch_tokens=t.micro_batch_tokens, num_minibatches=t.minibatches,
                          max_response_length=cfg.rollout.max_response_length)
    loss_fn = policy_loss_fn(model_cfg, ps, cfg.loss, temperature=cfg.rollout.temperature)
    actor = Actor(model_cfg, ps, chunks, optimizer, step_cfg, loss_fn, use_te=use_te)
    reference = None
    if cfg.loss.kl_coef > 0:   # KL to the initial policy: a frozen, forward-only copy of the start weights
        # no recompute (it never runs backward); the same layer spec and sequence parallelism as the
        # actor, whose packed microbatches it shares
        ref_model = build_model(model_cfg, ps, bf16=optim.bf16, sequence_parallel=p.sequence_parallel,
                                use_te=use_te)
        load_weights(ref_model, checkpoint_dir)
        ref_model.requires_grad_(False)
        reference = Actor(model_cfg, ps, [ref_model], None, step_cfg, loss_fn=None, use_te=use_te)
    reports = ps.is_last_stage and ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0
    flag = torch.tensor([dist.get_rank() if reports else 0], dtype=torch.int64, device="cpu")   # gloo side
    dist.all_reduce(flag)
    return Learner(cfg, model_cfg, ps, actor, int(flag), reference)


def rollout_to_samples(rollout, advantages: torch.Tensor, topk: int) -> list[dict]:
    """One training sample per response: per-token tensors aligned with `tokens` (prompt + response).

    loss_mask is 1 on response tokens; advantages are the sequence's, broadcast; rollout_logprobs (mu)
    and mu's top-K live on response positions. Prompt positions hold finite placeholders (0), never
    seen by the loss (loss_mask 0 there)."""
    out = []
    host = torch.device("cpu")   # samples are host records (engine output); the Actor moves packed rows
    for s, adv in zip(rollout.samples, advantages.tolist()):
        p, r = int(s.prompt_ids.numel()), int(s.response_ids.numel())
        tokens = torch.cat([s.prompt_ids, s.response_ids]).long().to(host)
        mask = torch.zeros(p + r, device=host)
        mask[p:] = 1.0
        mu = torch.zeros(p + r, device=host)
        mu[p:] = s.rollout_logprobs.float()
        sample = {"tokens": tokens, "loss_mask": mask, "advantages": torch.full((p + r,), float(adv), device=host),
                  "rollout_logprobs": mu}
        if topk:
            ids = torch.zeros(p + r, topk, dtype=torch.int64, device=host)
            lps = torch.zeros(p + r, topk, device=host)
            ids[p:] = s.topk_ids.long()
            lps[p:] = s.topk_logprobs.float().clamp(min=-1e4)   # vLLM may return -inf for zero-prob ids
            sample.update(topk_ids=ids, topk_logprobs=lps)
        out.append(sample)
    return out


@torch.no_grad()
def policy_logprobs(learner: Learner, samples: list[dict], reference: bool = False) -> Optional[list[torch.Tensor]]:
    """Log-probs of every token under pi at the current parameters, or under the frozen reference
    (last stage; None elsewhere)."""
    fn = logprob_fn(learner.model_cfg, learner.ps, temperature=learner.cfg.rollout.temperature)
    return (learner.reference if reference else learner.actor).compute_logprobs(samples, fn)


def probe_engines(learner: Learner, engine, prompts: list[list[int]], max_tokens: int,
                  tolerance: float) -> ProbeCheck:
    """The behavioural weight-sync check: rank 0's engine(s) sample a response to each probe prompt with
    mu's log-probs; every rank joins the learner's forward over the same tokens (it is collective); the
    result, on every rank, compares the two token by token. It sees what a parameter read-back cannot: a
    stale copy the engine derived from its weights (a repacked or fused layout, a tied LM head)."""
    rollouts = broadcast_object(engine.probe(prompts, max_tokens) if engine is not None else None, src=0)
    flat = [s for r in rollouts for s in r.samples]
    samples = rollout_to_samples(Rollout(flat), torch.zeros(len(flat), device="cpu"), topk=0)
    pi = policy_logprobs(learner, samples)
    check = None
    if pi is not None:   # the last stage: pi of every token, sliced to each response
        it = iter(lp[s.prompt_ids.numel():] for lp, s in zip(pi, flat))
        check = compare_probe(rollouts, [[next(it) for _ in r.samples] for r in rollouts], tolerance)
    return broadcast_object(check, src=learner.log_rank)


def hf_weights(learner: Learner) -> Iterator[tuple[str, torch.Tensor]]:
    """The learner's weights in HF naming, one full tensor at a time, yielded on global rank 0.

    Every rank must drive this generator to the end (other ranks yield nothing). Stage s > 0 sends its
    tensors to rank 0 point-to-point, one at a time, so no process holds more than one full tensor
    beyond its own shard. Only the dp0 / cp0 replica of each stage takes part (the others are copies)."""
    ps = learner.ps
    rank = dist.get_rank()
    model = unwrap(learner.actor.chunks[0])
    takes_part = ps.dp_rank == 0 and ps.cp_rank == 0
    # which global rank is tp0 of each stage (dp0, cp0): gathered once, every rank contributes
    stage_src = torch.zeros(ps.pp, dtype=torch.int64, device="cpu")   # a host vector: the gloo side
    if takes_part and ps.tp_rank == 0:
        stage_src[ps.pp_rank] = rank
    dist.all_reduce(stage_src)
    for stage in range(ps.pp):
        src = int(stage_src[stage])
        if takes_part and ps.pp_rank == stage:
            for name, tensor in iter_hf_tensors(model, learner.model_cfg, ps):
                if rank == 0:
                    yield name, tensor
                elif ps.tp_rank == 0:
                    dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=0)
                    dist.send(tensor.contiguous(), dst=0)
            if rank == src and rank != 0:
                dist.send_object_list([None], dst=0)
        elif rank == 0:
            while True:
                head = [None]
                dist.recv_object_list(head, src=src)
                if head[0] is None:
                    break
                name, shape, dtype = head[0]
                # on the model's device, like the sender's tensor: CUDA pairs go over NCCL, CPU over gloo
                buf = torch.empty(shape, dtype=dtype, device=learner.actor.device)
                dist.recv(buf, src=src)
                yield name, buf
    dist.barrier()


def broadcast_object(obj: Any, src: int) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
