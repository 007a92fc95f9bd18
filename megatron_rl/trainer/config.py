"""The RLVR job's configuration: YAML over these dataclasses, validated at start-up before anything runs.

    cfg = load_rl_config("examples/tiny_cpu/config.yaml", ["train.steps=5", "loss.mode=cppo"])
    cfg.check_startup(world_size)     # train() runs this first, on every rank

Each component owns its section and takes it as it is (no copy field by field): the prompt data set
`data` (trainer.data.DataConfig), the tracker `logging` (utils.tracking.TrackingConfig), the advantages
`advantage` (trainer.advantages.AdvantageConfig), the losses `loss` (losses.LossConfig); the sections
defined here are read by the learner (model, parallel, train, checkpoint) and the rollout side (rollout,
reward). The megatron and vLLM objects that take their own typed configs get them built in one place
each (trainer/learner.py: OptimConfig, StepConfig; trainer/rollouts.py: EngineConfig).

Validation, every error naming `section.key`, in two passes with nothing expensive in between:
    loading         each section's fields (its __post_init__), then what spans sections
                    (RLConfig.__post_init__: the loss against the rollout, sequence parallel rows, ...)
    check_startup   what needs more than the config: the model's config file (read, never converted),
                    the layout against it and the world size (check_layout, also the planner's), the
                    machine (check_hardware), the placement's environment, the data file, the reward's import
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_rl.losses import LossConfig
from megatron_rl.model_config import ModelConfig
from megatron_rl.trainer.advantages import AdvantageConfig
from megatron_rl.trainer.data import DataConfig
from megatron_rl.utils.config import load_dataclass
from megatron_rl.utils.tracking import TrackingConfig


def _positive(section, **values):
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"`{section}.{key}` must be >= 1, got {value}")


@dataclass
class ModelSection:
    checkpoint: str = ""          # a converted Megatron checkpoint dir (`megatron-rl convert hf-to-megatron`)
    hf_path: str = ""             # or an HF model dir: converted into `<run_dir>/base` before training
    dtype: Literal["float32", "bfloat16"] = "bfloat16"   # training precision (bf16 = Float16Module + fp32 master)

    def __post_init__(self):
        if not self.checkpoint and not self.hf_path:
            raise ValueError("`model.checkpoint` or `model.hf_path` must be set")

    @property
    def hf_dir(self) -> Path:
        """The HF model directory the engines and the tokenizer load (a converted checkpoint's `hf/`
        when only model.checkpoint is given)."""
        return Path(self.hf_path) if self.hf_path else Path(self.checkpoint) / "hf"

    def read_model_config(self) -> ModelConfig:
        """The model's shape, read from its config file without converting anything (start-up checks):
        the converted checkpoint's metadata, else the HF config.json. Errors name the key."""
        from megatron_rl.convert import read_metadata, to_model_config

        hf_key = "model.hf_path" if self.hf_path else "model.checkpoint"
        config_json = self.hf_dir / "config.json"
        if not config_json.is_file():   # the engines and the tokenizer start from this directory
            raise ValueError(f"`{hf_key}`: {self.hf_dir} holds no config.json (the HF model the rollout engines "
                             f"and the tokenizer load){'; set model.hf_path' if not self.hf_path else ''}")
        try:
            if self.checkpoint:
                return read_metadata(self.checkpoint)[0]
            return to_model_config(json.loads(config_json.read_text()), dtype=self.dtype)
        except (ValueError, RuntimeError, KeyError) as e:   # not a converted checkpoint / an unsupported model
            key = "model.checkpoint" if self.checkpoint else "model.hf_path"
            raise ValueError(f"`{key}`: {e}") from e


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1              # data parallel = world size / (tensor * pipeline * context)
    # shard the norm / dropout regions' activations along the sequence over the TP group (Megatron SP);
    # GPU only: it needs the transformer-engine layer spec (RLConfig.check_hardware, at start-up)
    sequence_parallel: bool = False

    def __post_init__(self):
        _positive("parallel", tensor=self.tensor, pipeline=self.pipeline, context=self.context)
        if self.sequence_parallel and self.tensor < 2:
            raise ValueError(f"`parallel.sequence_parallel` needs `parallel.tensor` > 1 (it shards activations "
                             f"over the tensor-parallel group), got tensor = {self.tensor}: set "
                             f"sequence_parallel: false or raise parallel.tensor")


@dataclass
class RolloutSection:
    placement: Literal["colocated", "disaggregated"] = "colocated"
    n_samples: int = 8            # responses per prompt (the GRPO group)
    temperature: float = 1.0      # both papers sample at T = 1 with no truncation
    top_p: float = 1.0
    top_k: int = -1
    max_prompt_length: int = 256
    max_response_length: int = 256
    engine_tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5   # on CPU: the share of host memory vLLM may reserve
    kv_cache_memory_mb: Optional[int] = None   # fixed KV-cache size instead of the utilization share
    enforce_eager: bool = True
    sleep_during_training: bool = False   # GPU, colocated: free the engine's memory while the learner trains
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    max_off_policy_lag: int = 0   # disaggregated: rollout of step k+1 may overlap training of step k
    engine_nodes: int = 0         # disaggregated: nodes given to the vLLM engines (the planner, the launcher)
    weight_sync_bucket_mb: int = 256
    # when to check the engines after a sync: first_last = the first sync of this process and the last
    # step's, every = after every sync, never. A check is the behavioural probe (the engines sample
    # probe_prompts responses of probe_tokens tokens and their log-probs must equal the learner's within
    # probe_tolerance, default by dtype: rollout.mismatch.PROBE_TOLERANCE) and, with weight_readback, the
    # parameter read-back (names the wrong tensor; costs about one more sync)
    weight_check: Literal["first_last", "every", "never"] = "first_last"
    probe_prompts: int = 4
    probe_tokens: int = 16
    probe_tolerance: Optional[float] = None
    weight_readback: bool = True
    seed: int = 0

    def __post_init__(self):
        _positive("rollout", n_samples=self.n_samples, max_prompt_length=self.max_prompt_length,
                  max_response_length=self.max_response_length,
                  engine_tensor_parallel=self.engine_tensor_parallel, probe_prompts=self.probe_prompts,
                  probe_tokens=self.probe_tokens)
        if self.probe_tolerance is not None and not (math.isfinite(self.probe_tolerance) and
                                                     self.probe_tolerance > 0):
            raise ValueError(f"`rollout.probe_tolerance` must be a finite number > 0 (or null: by dtype), "
                             f"got {self.probe_tolerance}")
        if self.temperature <= 0:
            raise ValueError(f"`rollout.temperature` must be > 0, got {self.temperature}")
        # algorithms.md Sec. 1: a truncated mu needs the same truncation in the trainer, which we do not
        # implement, so the ratio would be biased.
        if self.top_p != 1.0 or self.top_k != -1:
            raise ValueError("`rollout.top_p` / `rollout.top_k` truncation is not supported: the trainer "
                             "would need the same truncation or the importance ratio is biased; set "
                             "top_p: 1.0 and top_k: -1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("`rollout.gpu_memory_utilization` must be in (0, 1]")
        if self.max_off_policy_lag not in (0, 1):
            raise ValueError("`rollout.max_off_policy_lag` must be 0 or 1")
        if self.max_off_policy_lag and self.placement != "disaggregated":
            # the only check: a colocated engine cannot generate while the learner trains (it has no
            # `submit`), and RolloutQueue relies on this
            raise ValueError("`rollout.max_off_policy_lag` = 1 needs `rollout.placement: disaggregated`")
        if self.engine_nodes < 0:
            raise ValueError(f"`rollout.engine_nodes` must be >= 0, got {self.engine_nodes}")
        if self.engine_nodes and self.placement != "disaggregated":   # colocated engines share every node
            raise ValueError(f"`rollout.engine_nodes` = {self.engine_nodes} applies only to `rollout.placement: "
                             f"disaggregated`; set engine_nodes: 0 or the placement to disaggregated")


@dataclass
class RewardSection:
    fn: str = "math"              # math | exact_match | boxed_format | "package.module:function"
    # limits on the verifier (rewards/worker.py): a call over timeout_s, or every sample left when a
    # step's scoring exceeds step_timeout_s, scores 0 and is counted in reward/timeouts (and errors)
    timeout_s: float = 30.0
    step_timeout_s: float = 600.0

    def __post_init__(self):
        for key in ("timeout_s", "step_timeout_s"):
            if not getattr(self, key) > 0:   # finiteness: the loader (utils/config.py)
                raise ValueError(f"`reward.{key}` must be > 0, got {getattr(self, key)}")

    def check(self) -> None:
        """The function resolves (a user module imports and has it), before anything starts."""
        from megatron_rl.rewards.base import resolve_reward

        try:
            resolve_reward(self.fn)
        except ValueError as e:
            raise ValueError(f"`reward.fn`: {e}") from e


@dataclass
class TrainSection:
    steps: int = 100              # rollout batches
    prompts_per_step: int = 32
    minibatches: int = 1          # optimizer steps per rollout batch
    micro_batch_tokens: int = 4096    # packing budget per microbatch (whole sequences only)
    # activation recompute: none; selective (core attention's scores recomputed in backward); full (only
    # each layer's input kept, the layer recomputed). Less activation memory, more compute, same gradients.
    recompute: Literal["none", "selective", "full"] = "none"
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0        # max global grad norm; 0 disables clipping
    seed: int = 1234

    def __post_init__(self):
        _positive("train", steps=self.steps, prompts_per_step=self.prompts_per_step,
                  minibatches=self.minibatches, micro_batch_tokens=self.micro_batch_tokens)
        if self.lr <= 0:
            raise ValueError(f"`train.lr` must be > 0, got {self.lr}")
        # the optimizer would refuse these too, but only once the model is converted and built
        for key in ("weight_decay", "clip_grad"):
            if getattr(self, key) < 0:
                raise ValueError(f"`train.{key}` must be >= 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"`train.{key}` must be in [0, 1), got {getattr(self, key)}")


@dataclass
class CheckpointSection:
    every: int = 50               # steps between checkpoints; 0 = only at the end
    keep: int = 2                 # newest checkpoints kept
    resume: bool = True           # continue from the newest checkpoint in the run dir
    export_hf: bool = True        # write the final policy as an HF checkpoint
    # the newest checkpoint does not verify at resume: "error" stops the run (saying how to choose
    # "previous"); "previous" loads the newest older one that verifies, logging what was skipped and why
    on_damaged: str = "error"

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("`checkpoint.every` must be >= 0 and `checkpoint.keep` >= 1")
        if self.on_damaged not in ("error", "previous"):
            raise ValueError(f"`checkpoint.on_damaged` must be 'error' or 'previous', got {self.on_damaged!r}")


@dataclass
class RLConfig:
    model: ModelSection
    data: DataConfig
    run_dir: str = "runs/default"
    parallel: ParallelSection = field(default_factory=ParallelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        p, mbt = self.parallel, self.train.micro_batch_tokens
        if p.sequence_parallel and mbt % (p.tensor * p.context):
            # each CP rank's microbatch row (micro_batch_tokens / context) is split over the TP ranks
            raise ValueError(f"`train.micro_batch_tokens` = {mbt} must be a multiple of parallel.tensor x "
                             f"parallel.context = {p.tensor * p.context} with `parallel.sequence_parallel` "
                             f"(each row is split along the sequence over the tensor-parallel ranks)")
        self._check_loss()

    def _check_loss(self) -> None:
        """The loss settings the job cannot feed, refused at load (the Megatron step would refuse them
        only at the first training step, after the conversion and the first generation)."""
        loss, needs = self.loss, self.loss.needs
        chosen = f"`loss.mode` = {loss.mode!r}" + (f", `loss.divergence` = {loss.divergence!r}" if loss.divergence
                                                     else "")
        if needs.topk and loss.anchor == "old":
            # the divergence would be taken over pi_old's top-K ids (algorithms.md Sec. 3), and the trainer
            # computes pi_old's log-probs of the sampled tokens only; the engine's top-K is mu's
            raise ValueError(f"{chosen} measures the top-K divergence {needs.divergence!r}, which with "
                             f"`loss.anchor: old` needs pi_old's top-K ids per token; the trainer does not compute "
                             f"them (the engines return mu's). Set loss.anchor: rollout, or a divergence without "
                             f"top-K (loss.mode: dppo_binary_tv / dppo_binary_kl, or loss.divergence: binary_tv "
                             f"/ binary_kl)")
        if needs.full_logprobs:
            raise ValueError(f"{chosen} needs the full-vocabulary divergence {needs.divergence!r}, a single-process "
                             f"test oracle the training job does not run; use its top-K or binary form "
                             f"(e.g. loss.mode: dppo_topk_tv or dppo_binary_tv)")

    @property
    def logprobs_topk(self) -> int:
        """How many top-K log-probs per token the engines must return (0 = only the sampled token's)."""
        return self.loss.needs.rollout_topk

    def check_startup(self, world_size: int) -> None:
        """Everything the job needs beyond the config's own fields, on every rank, before anything is
        converted, started or loaded: a wrong setting fails in seconds and writes nothing."""
        from megatron_rl.megatron.model import resolve_use_te
        from megatron_rl.trainer.rollouts import check_placement_env

        model = self.model.read_model_config()
        self.check_layout(model, world_size)
        self.check_topk(model)
        self.check_hardware(use_te=resolve_use_te(None))
        check_placement_env(self.rollout.placement)
        self.data.check_readable()
        self.reward.check()

    def check_topk(self, model: ModelConfig) -> None:
        """The engines' top-K must fit the vocabulary: vLLM fails inside the engine otherwise ("selected
        index k out of range", EngineDeadError) after the conversion and the engine start. vLLM's
        max_logprobs is no second limit: the engine sets it to max(K, 20) (rollout/engine.py) and
        extra_engine_args may not override it."""
        if self.logprobs_topk > model.vocab_size:
            raise ValueError(f"`loss.topk` = {self.loss.topk} is larger than the model's vocabulary "
                             f"(vocab_size = {model.vocab_size}); the top-K divergence needs K <= vocab_size")

    def check_hardware(self, use_te: bool) -> None:
        """What the machine must offer for these settings. use_te: whether the transformer-engine layer
        spec will be used (megatron.model.resolve_use_te: CUDA and transformer_engine installed);
        sequence parallelism and context-parallel attention exist only there."""
        from megatron_rl.megatron.model import check_layer_spec

        check_layer_spec(use_te, sequence_parallel=self.parallel.sequence_parallel, cp=self.parallel.context)

    def check_layout(self, model: ModelConfig, world_size: int) -> int:
        """Validate the parallel layout and the token budget against the model and world size; return the
        data-parallel size. The planner runs this too (trainer/plan.py)."""
        p = self.parallel
        try:
            model.check_parallel(p.tensor, p.pipeline)
        except ValueError as e:
            raise ValueError(f"`parallel.tensor` / `parallel.pipeline`: {e}") from e
        per_replica = p.tensor * p.pipeline * p.context
        if world_size % per_replica:
            raise ValueError(f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline"
                             f" x parallel.context = {per_replica}; change the parallel section or the "
                             f"number of processes")
        if model.num_attention_heads % self.rollout.engine_tensor_parallel:
            raise ValueError(f"`rollout.engine_tensor_parallel` = {self.rollout.engine_tensor_parallel} does "
                             f"not divide num_attention_heads = {model.num_attention_heads}")
        mbt = self.train.micro_batch_tokens
        longest = self.rollout.max_prompt_length + self.rollout.max_response_length
        if mbt < longest:
            raise ValueError(f"`train.micro_batch_tokens` = {mbt} is smaller than the "
                             f"longest sequence (max_prompt_length + max_response_length = {longest}); a "
                             f"sequence is never split across microbatches: raise it")
        if p.context > 1 and mbt % (2 * p.context):
            # Megatron's load-balanced CP split cuts every packed segment, the row's padding tail included,
            # into 2 x context chunks: sequences are padded to that multiple, so the row must be one too
            raise ValueError(f"`train.micro_batch_tokens` = {mbt} must be a multiple of 2 x parallel.context = "
                             f"{2 * p.context} (the load-balanced context-parallel split)")
        return world_size // per_replica


# Float keys that may be infinite; every other float key must be finite (the loader refuses NaN and inf
# naming the key). delta_b = inf is the DPPO limit of the prefix-average budget (losses/config.py), a
# documented setting. Not loss.tis_cap: "no cap" is null there, and LossConfig refuses inf.
INF_ALLOWED = frozenset({"loss.delta_b"})


def load_rl_config(path: str | Path | None, overrides: list[str] | None = None) -> RLConfig:
    return load_dataclass(RLConfig, path, overrides, allow_inf=INF_ALLOWED)
