"""One training step under megatron-core's schedules: forward_step and THE loss adapter.

    actor = Actor(model_cfg, ps, chunks, optimizer, StepConfig(...), loss_fn, use_te=use_te)
    metrics = actor.train_on_rollout(local_samples)    # num_minibatches optimizer steps

`use_te` is the layer spec the chunks were built with (model.resolve_use_te, decided once by the caller
and given to build_training as well; None resolves it the same way build_model does). It alone picks how
packed rows reach attention: THD `packed_seq_params` for the transformer-engine spec, a block-diagonal
causal mask for the local spec, on CPU and on GPU alike. Microbatches move to the device of the model's
parameters.

Data: `local_samples` are this DP rank's sequences (packing.TrainingSample), in
minibatch order: `shard_for_dp` cuts a global rollout batch so that every layout takes the same
global minibatch at each optimizer step. Every TP / PP / CP rank of one DP replica gets the same list.

Normalisation (algorithms.md Sec. 5). Per optimizer step the global counts (loss tokens, sequences)
are summed ONCE over the DP ranks and all microbatches, before the schedule runs; each microbatch's
loss is its contribution to the global loss (its sum of per-token terms divided by global counts),
so the sum over microbatches and ranks IS the loss, whatever the split.

Megatron then rescales (schedules.forward_step_calc_loss with a 2-tuple loss: x cp_size / num_microbatches;
DDP: gradients summed over the dp x cp group and scaled by 1 / (dp * cp)). Net factor on our loss:
1 / (num_microbatches * dp). `_megatron_loss` undoes exactly that, and nothing else scales the loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rl.model_config import ModelConfig

from .model import check_layer_spec, resolve_use_te
from .packing import (Microbatch, TrainingSample, causal_block_mask, check_budget, pack_batch, row_cu_seqlens,
                      split_for_cp)
from .parallel import ParallelState
from .training import unwrap, zero_grads

# loss_fn(logits [S, V/tp] of this rank's vocabulary shard, microbatch, counts) ->
#   (this microbatch's contribution to the global loss (0-d, with grad), metrics {name: float tensor})
LossFn = Callable[[torch.Tensor, Microbatch, "StepCounts"], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class StepConfig:
    microbatch_tokens: int              # token budget of one microbatch row (whole sequences only)
    num_microbatches: Optional[int] = None   # None: as few as the budget allows (per DP rank)
    num_minibatches: int = 1            # optimizer steps per rollout batch (anchor fixed across them)
    max_response_length: Optional[int] = None   # L of seq-mean-token-sum-norm / CPPO horizon 'max'

    def __post_init__(self):
        if not isinstance(self.microbatch_tokens, int) or self.microbatch_tokens < 1:
            raise ValueError(f"StepConfig.microbatch_tokens: got {self.microbatch_tokens!r}; allowed: int >= 1")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"StepConfig.num_microbatches: got {self.num_microbatches!r}; allowed: None or >= 1")
        if self.num_minibatches < 1:
            raise ValueError(f"StepConfig.num_minibatches: got {self.num_minibatches!r}; allowed: >= 1")


@dataclass(frozen=True)
class StepCounts:
    """Global counts of one optimizer step (identical on every rank)."""

    num_tokens: torch.Tensor           # loss tokens in the global minibatch
    num_sequences: torch.Tensor        # sequences with at least one loss token
    max_response_length: Optional[int]


def shard_for_dp(samples: Sequence[Any], num_minibatches: int, dp: int, dp_rank: int) -> list:
    """This DP rank's share of a global rollout batch, minibatch by minibatch (contiguous minibatches,
    each dealt round-robin over DP ranks), so the global minibatch of step k is the same at any DP size."""
    n = len(samples)
    if n % num_minibatches:
        raise ValueError(f"num_minibatches={num_minibatches} does not divide the rollout batch ({n} sequences)")
    per = n // num_minibatches
    if per % dp:
        raise ValueError(f"data parallel size {dp} does not divide the minibatch ({per} sequences)")
    out = []
    for m in range(num_minibatches):
        out.extend(samples[m * per + dp_rank: (m + 1) * per: dp])
    return out


def local_counts(samples: Sequence[TrainingSample]) -> torch.Tensor:
    """[2] int64: (loss tokens, sequences with a loss token) of these samples. A sample's loss_mask is
    aligned with its tokens; the first token can never be a target, so it is excluded like packing does."""
    tokens = seqs = 0
    for s in samples:
        m = s.loss_mask
        k = int((m[1:] != 0).sum()) if m is not None else s.length - 1
        tokens += k
        seqs += int(k > 0)
    # host counters: reduced over the DP group's gloo side (cpu:gloo,cuda:nccl on GPU)
    return torch.tensor([tokens, seqs], dtype=torch.int64, device="cpu")


class Actor:
    """Runs forward/backward over packed microbatches and optimizer steps on one rank."""

    def __init__(self, model_cfg: ModelConfig, ps: ParallelState, chunks: list, optimizer,
                 cfg: StepConfig, loss_fn: LossFn, *, use_te: Optional[bool] = None):
        self.model_cfg, self.ps, self.chunks, self.optimizer = model_cfg, ps, chunks, optimizer
        self.cfg, self.loss_fn = cfg, loss_fn
        self.iteration = 0          # optimizer steps taken (checkpointed)
        self.consumed_samples = 0   # global sequences trained on (checkpointed)
        # an explicit spec is the one the chunks were built with (build_model already refused a machine that
        # cannot run it); None resolves it the way build_model's default does
        self.use_te = resolve_use_te(None) if use_te is None else bool(use_te)
        check_layer_spec(self.use_te, cp=ps.cp)   # CP attention is TE's; the CP loss side works anywhere
        self.device = _model_device(chunks)
        self._pad_multiple = 2 * ps.cp if ps.cp > 1 else 1

    # ---- data ------------------------------------------------------------------------------------
    def check_samples(self, samples: Sequence[TrainingSample]) -> None:
        check_budget([s.length for s in samples], self.cfg.microbatch_tokens,
                     self._pad_multiple)

    def microbatches(self, samples: Sequence[TrainingSample]) -> list[Microbatch]:
        # host rows without a mask: the local spec's [S, S] mask is built per forward on the model's
        # device (_model_inputs); the TE spec takes cu_seqlens (THD) instead and needs none
        mbs = pack_batch(samples, self.cfg.microbatch_tokens, self.cfg.num_microbatches,
                         cpu_attention_mask=False, pad_multiple=self._pad_multiple)
        if self.ps.cp > 1:   # (TE spec only: checked at construction)
            mbs = [split_for_cp(mb, self.ps.cp, self.ps.cp_rank) for mb in mbs]
        return mbs

    def _model_inputs(self, mb: Microbatch) -> tuple[Microbatch, dict]:
        """The microbatch on the model's device with this spec's attention inputs: the local spec's
        block-diagonal causal mask (built there from the host boundaries), or the TE spec's THD params."""
        # both read the boundaries from the host copy: no device sync
        mask = None if self.use_te else causal_block_mask(mb.cu_seqlens, mb.num_tokens, self.device)
        kwargs = {"packed_seq_params": _packed_seq_params(mb, self.device)} if self.use_te else {}
        if self.device.type != "cpu":
            mb = mb.to(self.device)
        if mask is not None:
            mb = dataclasses.replace(mb, attention_mask=mask)
        return mb, kwargs

    def _global_counts(self, samples: Sequence[TrainingSample]) -> StepCounts:
        c = local_counts(samples)
        if self.ps.dp > 1:   # CP ranks hold the same sequences: the DP group (without CP) is the sum
            dist.all_reduce(c, group=self.ps.dp_group)
        return StepCounts(c[0], c[1], self.cfg.max_response_length)

    # ---- megatron plumbing -----------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        mb, kwargs = self._model_inputs(next(data_iterator))
        out = model(mb.tokens, mb.position_ids, mb.attention_mask, **kwargs)
        return out, lambda output: self._megatron_loss(mb, output)

    def _megatron_loss(self, mb: Microbatch, output: torch.Tensor):
        """THE loss adapter (last pipeline stage, once per microbatch)."""
        # [1, S, V/tp] -> [S, V/tp] by a view: indexing (output[0]) would make autograd allocate and
        # zero-fill a whole new [1, S, V/tp] gradient, undoing the loss's inplace_backward saving
        logits = output.squeeze(0) if output.dim() == 3 else output
        contribution, metrics = self.loss_fn(logits, mb, self._counts)
        # Undo megatron's 1 / (num_microbatches * dp): see the module docstring. The only place.
        scaled = contribution * (self._num_microbatches * self.ps.dp)
        report = {"loss": contribution.detach().clone()}   # clone: megatron divides the returned tensor in place
        report.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()})
        return scaled, report

    def _run_schedule(self, mbs: list[Microbatch], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._num_microbatches = len(mbs)
        fwd_bwd = get_forward_backward_func()
        # seq_length is the whole row: the schedule's p2p shapes divide it by CP (and by TP with SP) itself
        return fwd_bwd(forward_step_func=self._forward_step, data_iterator=iter(mbs), model=self.chunks,
                       num_microbatches=len(mbs), seq_length=self.cfg.microbatch_tokens,
                       micro_batch_size=1, forward_only=forward_only)

    # ---- public ----------------------------------------------------------------------------------
    def train_minibatch(self, samples: Sequence[TrainingSample]) -> dict:
        """One optimizer step on this rank's share of one global minibatch."""
        self.check_samples(samples)
        self._counts = self._global_counts(samples)
        mbs = self.microbatches(samples)
        for c in self.chunks:
            c.train()
        zero_grads(self.chunks, self.optimizer)
        reports = self._run_schedule(mbs, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.iteration += 1
        self.consumed_samples += int(self._counts_sequences_total(samples))
        return self._summarise(reports, ok, grad_norm)

    def train_on_rollout(self, samples: Sequence[TrainingSample]) -> list[dict]:
        """cfg.num_minibatches optimizer steps over this rank's rollout share (see shard_for_dp).

        The anchor log-probs (rollout_logprobs, or old_logprobs computed by `compute_logprobs` before
        this call) are fields of the samples and are not touched here, so they stay fixed across the
        minibatches while the parameters move."""
        n = len(samples)
        k = self.cfg.num_minibatches
        if n % k:
            raise ValueError(f"StepConfig.num_minibatches={k} does not divide this rank's {n} sequences")
        self.check_samples(samples)
        per = n // k
        return [self.train_minibatch(samples[i * per:(i + 1) * per]) for i in range(k)]

    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[TrainingSample], logprob_fn: Callable) -> Optional[list]:
        """Forward only over `samples` at the current parameters; returns per-sample tensors aligned with
        tokens (value i = log p(token i), 0 at i = 0) on the LAST pipeline stage, None elsewhere.
        `logprob_fn(logits [S, V/tp], mb) -> [S]` per-position log-probs of the labels (e.g. pi_old)."""
        self.check_samples(samples)
        mbs = self.microbatches(samples)
        for c in self.chunks:
            c.eval()
        outs = []

        def loss(mb, output):
            logits = output[0] if output.dim() == 3 else output
            outs.append((mb, logprob_fn(logits, mb).detach()))
            return torch.zeros((), device=logits.device), {}

        def fwd(data_iterator, model):
            mb, kwargs = self._model_inputs(next(data_iterator))
            return model(mb.tokens, mb.position_ids, mb.attention_mask, **kwargs), lambda o: loss(mb, o)

        from megatron.core.pipeline_parallel import get_forward_backward_func

        get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter(mbs), model=self.chunks,
                                    num_microbatches=len(mbs), seq_length=self.cfg.microbatch_tokens,
                                    micro_batch_size=1, forward_only=True)
        if not self.ps.is_last_stage:
            return None
        result: list = [None] * len(samples)
        home = samples[0].tokens.device if samples else torch.device("cpu")
        for mb, lp in outs:
            bounds = mb.cu_seqlens.tolist()
            lp = lp.float().to(home)   # one copy per row: results live with the samples (the host)
            for j, i in enumerate(mb.seq_ids.tolist()):
                L = samples[i].length
                seg = lp[bounds[j]:bounds[j] + L - 1]
                result[i] = torch.cat([seg.new_zeros(1), seg])   # realign with tokens
        return result

    # ---- helpers ---------------------------------------------------------------------------------
    def _counts_sequences_total(self, samples) -> int:
        n = torch.tensor([len(samples)], dtype=torch.int64, device="cpu")   # host counter (gloo side)
        if self.ps.dp > 1:
            dist.all_reduce(n, group=self.ps.dp_group)
        return int(n)

    def _summarise(self, reports: list, ok: bool, grad_norm) -> dict:
        """Global loss and metrics on the last stage, then broadcast along the pipeline. Following
        megatron_rl.losses' rule, every value is this microbatch's share of the global value (SUM over
        microbatches and DP x CP ranks), except keys ending in `_max` (MAX)."""
        # host vectors throughout: a few scalars per step, reduced over the groups' gloo side
        keys = ["loss"] + sorted(k for k in reports[0] if k != "loss") if reports else ["loss"]
        is_max = torch.tensor([k.endswith("_max") for k in keys], dtype=torch.bool, device="cpu")
        vec = torch.zeros(len(keys), dtype=torch.float64, device="cpu")
        if self.ps.is_last_stage and reports:
            vals = torch.tensor([[float(r[k]) for k in keys] for r in reports], dtype=torch.float64,
                                device="cpu")
            vec = torch.where(is_max, vals.max(0).values, vals.sum(0))
            if self.ps.dp * self.ps.cp > 1:
                hi = torch.where(is_max, vec, torch.full_like(vec, -float("inf")))
                dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.ps.dp_cp_group)
                dist.all_reduce(vec, group=self.ps.dp_cp_group)
                vec = torch.where(is_max, hi, vec)
        if self.ps.pp > 1:
            n = torch.tensor([len(keys)], dtype=torch.int64, device="cpu")
            last = dist.get_global_rank(self.ps.pp_group, self.ps.pp - 1)
            dist.broadcast(n, src=last, group=self.ps.pp_group)
            if int(n) != vec.numel():
                vec = torch.zeros(int(n), dtype=torch.float64, device="cpu")
            dist.broadcast(vec, src=last, group=self.ps.pp_group)
        out = {"loss": float(vec[0]) if vec.numel() else 0.0,   # keys[0] is "loss" on every rank
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "update_successful": bool(ok), "iteration": self.iteration,
               "num_tokens": int(self._counts.num_tokens), "num_sequences": int(self._counts.num_sequences)}
        if self.ps.is_last_stage:
            out.update({k: float(v) for k, v in zip(keys[1:], vec[1:].tolist())})
        return out


def _model_device(chunks: list) -> torch.device:
    """Where the chunks' parameters live (the model decides, not the machine: a CPU model on a CUDA
    machine stays on the CPU). A chunk without parameters (an empty pipeline stage) says nothing, so
    the current CUDA device is assumed when there is one."""
    for chunk in chunks:
        p = next(unwrap(chunk).parameters(), None)
        if p is not None:
            return p.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _packed_seq_params(mb: Microbatch, device: Optional[torch.device] = None):
    """THD attention (the transformer-engine spec): segments from cu_seqlens, the padding tail its own
    (row_cu_seqlens); the boundaries on `device` (default: the microbatch's). Give the host microbatch:
    max_seqlen is read from its boundaries."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = row_cu_seqlens(mb).tolist()
    cu_t = torch.tensor(cu, dtype=torch.int32, device=mb.tokens.device if device is None else device)
    max_len = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    # segments are already padded (to 2 * cp under CP), so padded and unpadded boundaries coincide
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                           cu_seqlens_q_padded=cu_t, cu_seqlens_kv_padded=cu_t,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
