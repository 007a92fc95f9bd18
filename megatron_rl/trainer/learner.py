"""The learner side of the loop, and the loop's one door to Megatron: `Learner`.

    learner = Learner.build(cfg)            # the base model converted once, actor (+ frozen reference)
    data_state = learner.resume()           # the newest checkpoint, if any; learner.step = its RL step
    samples = learner.samples(scored, m)    # rank 0's scored rollout -> training samples on every rank
    metrics = learner.train(samples)        # one RL step: this rank's DP share, `minibatches` updates
    learner.hf_weights()                    # its weights in HF layout, for the engines (and the export)
    learner.check_probe(probe, tolerance)   # the weight-sync probe's learner side
    learner.save(data_state); learner.export()

megatron.core itself is reached only through megatron_rl.megatron; trainer/loop.py imports none of it.
The data-parallel reductions of what the learner measures (the pi - mu mismatch) happen in here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_rl.convert import read_metadata
from megatron_rl.losses import LossConfig
from megatron_rl.megatron.checkpoint import load_newest, save_checkpoint
from megatron_rl.megatron.hf_checkpoint import export_hf, hf_to_megatron, iter_hf_tensors, load_weights
from megatron_rl.megatron.model import build_model, resolve_use_te
from megatron_rl.megatron.packing import TrainingSample
from megatron_rl.megatron.parallel import ParallelState, initialize_parallel
from megatron_rl.megatron.parallel import init_world as start_world
from megatron_rl.megatron.policy import logprob_fn, policy_loss_fn
from megatron_rl.megatron.step import Actor, StepConfig, shard_for_dp
from megatron_rl.megatron.training import OptimConfig, build_training, unwrap
from megatron_rl.model_config import ModelConfig
from megatron_rl.rollout.mismatch import ProbeCheck, compare_probe, logprob_mismatch
from megatron_rl.rollout.types import Rollout
from megatron_rl.trainer.config import CheckpointSection, RLConfig
from megatron_rl.utils.config import to_dict
from megatron_rl.utils.tracking import truncate_jsonl


def init_world() -> tuple[int, int]:
    """torch.distributed from torchrun's environment, or a world of one (megatron.parallel.init_world,
    exporting the torchrun variables). Returns (rank, world_size)."""
    start_world(export_env=True)
    return dist.get_rank(), dist.get_world_size()


def prepare_model(cfg: RLConfig) -> Path:
    """The Megatron checkpoint to start from: model.checkpoint, or model.hf_path converted once into
    run_dir/base at the configured layout (every rank; the conversion is collective)."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint)
    ckpt = Path(cfg.run_dir) / "base"
    if not (ckpt / "megatron_rl_model.json").exists():
        p = cfg.parallel
        hf_to_megatron(cfg.model.hf_path, ckpt, tp=p.tensor, pp=p.pipeline, overwrite=True)
    return ckpt


def optim_config(cfg: RLConfig) -> OptimConfig:
    """megatron's optimizer config from the train section (and model.dtype): the one place it is built."""
    t = cfg.train
    return OptimConfig(lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                       clip_grad=t.clip_grad, bf16=cfg.model.dtype == "bfloat16")


def step_config(cfg: RLConfig) -> StepConfig:
    """The Actor's packing and minibatch config from the train section: the one place it is built.
    max_response_length is the L of seq-mean-token-sum-norm and of CPPO's horizon `max`."""
    t = cfg.train
    return StepConfig(microbatch_tokens=t.micro_batch_tokens, num_minibatches=t.minibatches,
                      max_response_length=cfg.rollout.max_response_length)


class Learner:
    """The Megatron actor (+ the frozen reference when loss.kl_coef > 0) at the configured layout, and
    every operation of the loop on it. `step` counts the RL steps whose update it holds (a resumed run
    starts at the checkpoint's): the version of the weights it streams to the engines."""

    def __init__(self, cfg: RLConfig, model_cfg: ModelConfig, ps: ParallelState, actor: Actor,
                 reference: Optional[Actor], log_rank: int):
        self.model_cfg, self.ps, self.actor, self.reference = model_cfg, ps, actor, reference
        self.log_rank = log_rank     # the global rank holding the last stage's tp0/dp0/cp0 results
        self.hf_dir = cfg.model.hf_dir   # the HF model the engines and the tokenizer load (and the export's files)
        self.loss: LossConfig = cfg.loss
        self.temperature = cfg.rollout.temperature   # the sampler's: pi is scored at mu's temperature
        self.checkpoints: CheckpointSection = cfg.checkpoint
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.export_dir = self.run_dir / "hf_final"
        self.run_config = to_dict(cfg)   # written into every checkpoint
        self.step = 0
        self._first_step = 0            # this process's first RL step (resume moves it)

    @classmethod
    def build(cls, cfg: RLConfig) -> "Learner":
        """Model + distributed optimizer + actor at the config's layout, weights from the base checkpoint
        (prepare_model; a training checkpoint is loaded afterwards by `resume`). RLConfig.check_startup
        checked the layout and the hardware before anything was converted."""
        checkpoint_dir = prepare_model(cfg)
        model_cfg, _ = read_metadata(checkpoint_dir)
        p = cfg.parallel
        ps = initialize_parallel(tp=p.tensor, pp=p.pipeline, cp=p.context, seed=cfg.train.seed, model_cfg=model_cfg)
        optim, step_cfg = optim_config(cfg), step_config(cfg)
        # the layer spec, decided once here: the actor, the reference model and how both take packed rows
        # (THD for transformer-engine, block-diagonal masks for the local spec) all follow it
        use_te = resolve_use_te(None)
        chunks, optimizer = build_training(model_cfg, ps, optim, init=lambda m: load_weights(m, checkpoint_dir),
                                           recompute=cfg.train.recompute, sequence_parallel=p.sequence_parallel,
                                           use_te=use_te)
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
        return cls(cfg, model_cfg, ps, actor, reference, int(flag))

    # ---- training ------------------------------------------------------------------------------------------
    @property
    def batch_unit(self) -> int:
        """A rollout batch must hold a multiple of this many samples: every DP rank and every minibatch
        takes an equal share."""
        return self.actor.cfg.num_minibatches * self.ps.dp

    def samples(self, scored: Optional[tuple[Rollout, torch.Tensor]], metrics: dict) -> list[TrainingSample]:
        """Rank 0's scored rollout (kept samples, their advantages) as per-token training samples on every
        rank, trimmed to a multiple of `batch_unit` (logged as train/samples_trimmed, rarely non-zero)."""
        samples = None
        if scored is not None:
            samples = rollout_to_samples(*scored, topk=scored[0].topk)
            trimmed = len(samples) - len(samples) // self.batch_unit * self.batch_unit
            metrics["train/samples_trimmed"] = trimmed
            samples = samples[: len(samples) - trimmed]
        return broadcast_object(samples, src=0)

    def train(self, samples: list[TrainingSample]) -> dict:
        """One RL step: `minibatches` optimizer steps on this rank's DP share, the anchor fixed across them.
        The metrics (on every rank) come from the last stage's reporting rank."""
        # the first step of this process samples with the weights it trains from: pi = mu but for the
        # engine's numerics, which the mismatch metrics measure
        first = self.step == self._first_step
        self.step += 1
        if not samples:
            return {"train/skipped": 1}
        local = shard_for_dp(samples, self.actor.cfg.num_minibatches, self.ps.dp, self.ps.dp_rank)
        out = {}
        if first or self.loss.anchor == "old":   # one recompute pass: pi at the rollout's parameters
            pi = self.logprobs(local)
            if pi is not None:
                if self.loss.anchor == "old":
                    for s, lp in zip(local, pi):
                        s.old_logprobs = lp
                out.update(self._mismatch(local, pi))
        if self.reference is not None:   # loss.kl_coef > 0: log-probs of the frozen initial policy
            ref = self.logprobs(local, reference=True)
            for s, lp in zip(local, ref or []):
                s.ref_logprobs = lp
        reports = self.actor.train_on_rollout(local)
        if self.ps.is_last_stage:
            for key in reports[0]:
                values = [r[key] for r in reports if isinstance(r.get(key), (int, float))]
                if values:
                    out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
        return broadcast_object(out, src=self.log_rank)

    @torch.no_grad()
    def logprobs(self, samples: list[TrainingSample], reference: bool = False) -> Optional[list[torch.Tensor]]:
        """Log-probs of every token under pi at the current parameters, or under the frozen reference
        (last stage; None elsewhere)."""
        fn = logprob_fn(self.model_cfg, self.ps, temperature=self.temperature)
        return (self.reference if reference else self.actor).compute_logprobs(samples, fn)

    def _mismatch(self, samples: list[TrainingSample], pi: list[torch.Tensor]) -> dict:
        """|pi_a - mu_a| on sampled response tokens (algorithms.md Sec. 7), reduced over the DP ranks."""
        mask = torch.cat([s.loss_mask for s in samples]) != 0
        m = logprob_mismatch(torch.cat(pi), torch.cat([s.rollout_logprobs for s in samples]), mask)
        # host scalars (floats already): reduced over the DP group's gloo side
        sums = torch.tensor([m["prob_diff_sum"], float(m["num_tokens"])], dtype=torch.float64, device="cpu")
        maxes = torch.tensor([m["prob_diff_max"], m["logprob_diff_max"]], dtype=torch.float64, device="cpu")
        if self.ps.dp > 1:
            dist.all_reduce(sums, group=self.ps.dp_group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.ps.dp_group)
        return {"mismatch/prob_diff_mean": float(sums[0] / sums[1].clamp(min=1)),
                "mismatch/prob_diff_max": float(maxes[0]), "mismatch/logprob_diff_max": float(maxes[1])}

    # ---- the weights, out -----------------------------------------------------------------------------------
    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The learner's weights in HF naming, one full tensor at a time, yielded on global rank 0.

        Every rank must drive this generator to the end (other ranks yield nothing). Stage s > 0 sends its
        tensors to rank 0 point-to-point, one at a time, so no process holds more than one full tensor
        beyond its own shard. Only the dp0 / cp0 replica of each stage takes part (the others are copies)."""
        ps = self.ps
        rank = dist.get_rank()
        model = unwrap(self.actor.chunks[0])
        takes_part = ps.dp_rank == 0 and ps.cp_rank == 0
        # which global rank is tp0 of each stage (dp0, cp0): gathered once, every rank contributes
        stage_src = torch.zeros(ps.pp, dtype=torch.int64, device="cpu")   # a host vector: the gloo side
        if takes_part and ps.tp_rank == 0:
            stage_src[ps.pp_rank] = rank
        dist.all_reduce(stage_src)
        for stage in range(ps.pp):
            src = int(stage_src[stage])
            if takes_part and ps.pp_rank == stage:
                for name, tensor in iter_hf_tensors(model, self.model_cfg, ps):
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
                    buf = torch.empty(shape, dtype=dtype, device=self.actor.device)
                    dist.recv(buf, src=src)
                    yield name, buf
        dist.barrier()

    def check_probe(self, probe: Optional[list[Rollout]], tolerance: float) -> ProbeCheck:
        """The weight-sync probe's learner side: rank 0's probe rollouts (the engines' seeded responses with
        mu's log-probs; None on the other ranks) go to every rank, which joins the learner's forward over
        the same tokens (it is collective); the result, on every rank, compares the two token by token. It
        sees what a parameter read-back cannot: a stale copy the engine derived from its weights (a
        repacked or fused layout, a tied LM head)."""
        rollouts = broadcast_object(probe, src=0)
        flat = [s for r in rollouts for s in r.samples]
        samples = rollout_to_samples(Rollout(flat), torch.zeros(len(flat), device="cpu"), topk=0)
        pi = self.logprobs(samples)
        check = None
        if pi is not None:   # the last stage: pi of every token, sliced to each response
            it = iter(lp[s.prompt_ids.numel():] for lp, s in zip(pi, flat))
            check = compare_probe(rollouts, [[next(it) for _ in r.samples] for r in rollouts], tolerance)
        return broadcast_object(check, src=self.log_rank)

    def export(self) -> None:
        """The policy as an HF checkpoint in run_dir/hf_final (streamed per stage; tokenizer files from the
        base model)."""
        source = json.loads((self.hf_dir / "config.json").read_text())
        export_hf(unwrap(self.actor.chunks[0]), self.model_cfg, self.ps, self.export_dir, self.hf_dir, source,
                  overwrite=True)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save(self, data_state: dict) -> None:
        """A training checkpoint of RL step `step` (model, optimizer, RNG, counters) with the prompt
        loader's position `data_state` (after step - 1's prompts, not the prefetched ones); the newest
        checkpoint.keep complete ones are kept."""
        root = self.checkpoint_root
        save_checkpoint(root, self.actor, extra={"trainer_step": self.step, "data": data_state,
                                                 "config": self.run_config})
        if dist.get_rank() == 0:
            done = sorted(p for p in root.glob("iter_*") if p.is_dir())
            for old in done[: -self.checkpoints.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def resume(self) -> Optional[dict]:
        """Load the newest complete checkpoint under run_dir/checkpoints (checkpoint.resume; a damaged one
        per checkpoint.on_damaged); `step` becomes its RL step. Returns its prompt-loader position, or
        None for a fresh start. The run's metrics.jsonl / rollouts.jsonl lose their rows of the steps
        after it (those steps run again), so each step appears once."""
        if not self.checkpoints.resume:
            return None
        path, manifest, skipped = load_newest(self.checkpoint_root, self.actor, self.checkpoints.on_damaged)
        if dist.get_rank() == 0:
            for bad, why in skipped:
                print(f"checkpoint.on_damaged=previous: skipped {bad}: {why}", flush=True)
        if path is None and skipped:
            raise RuntimeError(f"no checkpoint under {self.checkpoint_root} verifies (all {len(skipped)} are "
                               "damaged, see above); remove them to start from the base model")
        extra = manifest.get("extra", {}) if path is not None else {}
        self.step = self._first_step = int(extra.get("trainer_step", 0))
        if dist.get_rank() == 0:
            # the rows of steps >= step come from the interrupted process (logged after its last
            # checkpoint, or before its first): they are written again now
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                dropped = truncate_jsonl(self.run_dir / name, before_step=self.step)
                if dropped:
                    print(f"{name}: dropped {dropped} row(s) of steps >= {self.step} (run again)", flush=True)
            if path is not None:
                print(f"resumed from {path} at step {self.step}", flush=True)
        dist.barrier()   # the files are trimmed before rank 0's Tracker / Rollouts append to them
        return extra["data"] if path is not None else None


def rollout_to_samples(rollout, advantages: torch.Tensor, topk: int) -> list[TrainingSample]:
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
        ids = lps = None
        if topk:
            ids = torch.zeros(p + r, topk, dtype=torch.int64, device=host)
            lps = torch.zeros(p + r, topk, device=host)
            ids[p:] = s.topk_ids.long()
            lps[p:] = s.topk_logprobs.float().clamp(min=-1e4)   # vLLM may return -inf for zero-prob ids
        out.append(TrainingSample(tokens=tokens, loss_mask=mask, rollout_logprobs=mu,
                                  advantages=torch.full((p + r,), float(adv), device=host),
                                  rollout_topk_ids=ids, rollout_topk_logprobs=lps))
    return out


def broadcast_object(obj: Any, src: int) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
