"""The layout and memory planner: `megatron-rl plan --config FILE --nodes N --gpus-per-node G --gpu-memory GiB`.

Before a SLURM allocation is spent: checks that the job's parallel layout can exist on the cluster (TP
divides heads and KV heads, PP divides layers, world = TP x PP x CP x DP, engines fit a node, the rollout
batch splits over DP), then estimates one GPU's peak memory per pipeline stage (plan_memory.py: weights,
gradients, distributed-optimizer state, activations with the configured recompute, the loss's logits, the
colocated vLLM engine) and refuses a layout that does not fit, naming what to change. docs/planner.md has
every term, its assumption and its source.

    plan = make_plan(cfg, model_cfg, Cluster(nodes=8, gpus_per_node=8, gpu_gib=80))
    print(format_plan(plan)); plan.ok

Pure Python: importing this module needs no torch (the CLI's config loader does, through the loss config).
The config's train.recompute, parallel.sequence_parallel, rollout.sleep_during_training and
rollout.engine_nodes are what the trainer runs with; the planner's flags of the same meaning override them
for exploring, and the plan notes when a flag differs from the config (the trainer applies the config); with
--emit-env (launch.sh, before a job) a differing flag is an error, so a job never runs what was not planned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_rl.model_config import ModelConfig
from megatron_rl.trainer.plan_memory import (BACKENDS, CHUNK_BYTES, FRAGMENTATION, GIB, MIB, RECOMPUTE,
                                             RESERVE_GIB, Setup, StageMemory, fits, layer_params,
                                             microbatches_per_step, stage_params, total_params)

# re-exported: the planner's public names (tests, docs) stay importable from here
__all__ = ["BACKENDS", "CHUNK_BYTES", "GIB", "KNOWN_MODELS", "RECOMPUTE", "Cluster", "Plan", "PlanOptions",
           "Setup", "StageMemory", "build_setup", "env_lines", "format_plan", "layer_params", "layout_errors",
           "make_plan", "plan_main", "resolve_model", "stage_params", "suggestions", "total_params"]

# Shape fields of the published config.json of the recipes' models (huggingface.co/<repo>/blob/main/config.json:
# Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-32B-Instruct, Qwen/Qwen2.5-72B-Instruct, meta-llama/Llama-3.3-70B-Instruct).
# Used when the model directory is not readable where the planner runs (login node, dry run); the fields
# go through the converter's own mapping (megatron_rl.convert.to_model_config), as a real config.json would.
_QWEN = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "use_sliding_window": False,
         "tie_word_embeddings": False, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "vocab_size": 152064}
KNOWN_MODELS: dict[str, dict] = {
    "Qwen2.5-7B": {**_QWEN, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4},
    "Qwen2.5-32B": {**_QWEN, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                    "num_attention_heads": 40, "num_key_value_heads": 8},
    "Qwen2.5-72B": {**_QWEN, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "Llama-3.3-70B": {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 8192,
                      "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                      "rope_theta": 500000.0, "tie_word_embeddings": False,
                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_gib: float


@dataclass(frozen=True)
class PlanOptions:
    """Planner-only settings; None = the config's value (RLConfig) or the backend's default."""
    backend: str = "gpu"
    recompute: Optional[str] = None            # none | selective | full
    sequence_parallel: Optional[bool] = None
    engine_sleep: Optional[bool] = None        # colocated engine offloads weights / drops KV while training
    engine_nodes: Optional[int] = None         # disaggregated: nodes given to the vLLM engines
    reserve_gib: Optional[float] = None
    fragmentation: Optional[float] = None
    engine_overhead_gib: float = 2.0           # vLLM's activation / sampler workspace beside weights + KV cache
    sleep_residual_gib: float = 1.0            # what a sleeping engine keeps on the GPU (its CUDA context)


@dataclass
class Plan:
    setup: Setup
    ok: bool
    errors: list[str]
    stages: list[StageMemory] = field(default_factory=list)
    engine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    notes_from_flags: list[str] = field(default_factory=list)   # planner flags that differ from the config
    suggestions: list[str] = field(default_factory=list)
    microbatches: int = 0
    convert_nodes: int = 0
    convert_nproc: int = 0


# ------------------------------------------------------------------------------------------- checks

def layout_errors(s: Setup) -> list[str]:
    """Everything that makes the layout impossible, each naming the setting to change."""
    m, errs, G = s.model, [], s.gpus_per_node
    try:
        m.check_parallel(s.tp, s.pp)
    except ValueError as e:
        errs.append(f"parallel.tensor / parallel.pipeline: {e}")
    if s.placement == "disaggregated" and not 0 < s.engine_nodes < s.nodes:
        errs.append(f"rollout.placement disaggregated needs 0 < rollout.engine_nodes < nodes; got {s.engine_nodes} "
                    f"engine nodes of {s.nodes}: set rollout.engine_nodes (planner flag --engine-nodes)")
    if s.sequence_parallel and s.tp < 2:
        errs.append(f"parallel.sequence_parallel needs parallel.tensor > 1, got {s.tp}")
    if s.sequence_parallel and s.backend == "cpu":
        errs.append("parallel.sequence_parallel needs the transformer-engine layer spec on GPU (backend gpu); "
                    "set parallel.sequence_parallel: false")
    if s.sp and s.micro_batch_tokens % (s.tp * s.cp):
        errs.append(f"train.micro_batch_tokens = {s.micro_batch_tokens} must be a multiple of parallel.tensor x "
                    f"parallel.context = {s.tp * s.cp} with parallel.sequence_parallel (rows split over TP)")
    replica = s.tp * s.pp * s.cp
    if s.train_gpus < replica or s.train_gpus % replica:
        other = s.nodes - s.train_gpus // G          # engine nodes when disaggregated
        nodes_ok = [n for n in range(other + 1, 4 * s.nodes + 9) if ((n - other) * G) % replica == 0][:4]
        errs.append(f"world size {s.train_gpus} (training GPUs) is not a multiple of parallel.tensor x "
                    f"parallel.pipeline x parallel.context = {s.tp} x {s.pp} x {s.cp} = {replica}: use "
                    f"{' or '.join(map(str, nodes_ok)) or 'more'} nodes, or a smaller TP x PP x CP")
    if s.tp > G or G % s.tp:
        errs.append(f"parallel.tensor = {s.tp} must divide gpus per node = {G}: tensor parallelism across "
                    f"nodes is not supported (its all-reduces need NVLink); raise parallel.pipeline instead")
    if s.cp > 1 and s.backend == "cpu":
        errs.append("parallel.context > 1 needs transformer-engine attention (GPU); set parallel.context: 1")
    if s.cp > 1 and s.micro_batch_tokens % (2 * s.cp):
        errs.append(f"train.micro_batch_tokens = {s.micro_batch_tokens} must be a multiple of 2 x parallel.context"
                    f" = {2 * s.cp} (load-balanced context-parallel split)")
    if s.micro_batch_tokens < s.longest:
        errs.append(f"train.micro_batch_tokens = {s.micro_batch_tokens} is below the longest sequence "
                    f"(rollout.max_prompt_length + max_response_length = {s.longest}); raise it")
    if m.num_attention_heads % s.etp:
        errs.append(f"rollout.engine_tensor_parallel = {s.etp} must divide num_attention_heads = {m.num_attention_heads}")
    if m.num_query_groups % s.etp and s.etp % m.num_query_groups:
        errs.append(f"rollout.engine_tensor_parallel = {s.etp} and the {m.num_query_groups} KV heads: one must "
                    f"divide the other (vLLM shards or replicates KV heads)")
    if s.etp > G or G % s.etp:
        errs.append(f"rollout.engine_tensor_parallel = {s.etp} must divide gpus per node = {G} (an engine "
                    f"stays inside one node)")
    if s.dp >= 1 and s.train_gpus % replica == 0:
        if s.sequences % s.minibatches:
            errs.append(f"train.minibatches = {s.minibatches} must divide the rollout batch (train.prompts_per_step"
                        f" x rollout.n_samples = {s.sequences})")
        elif (s.sequences // s.minibatches) % s.dp:
            errs.append(f"data parallel size {s.dp} must divide the {s.sequences // s.minibatches} sequences of "
                        f"a minibatch: change train.prompts_per_step, rollout.n_samples or train.minibatches, "
                        f"or the number of nodes")
    conv = s.tp * s.pp
    if conv > G and (conv % G or conv // G > s.nodes):
        errs.append(f"the conversion runs TP x PP = {conv} processes, which must fill whole nodes of {G} GPUs "
                    f"(at most the job's {s.nodes}): change parallel.tensor / parallel.pipeline or the nodes")
    return errs


def _variations(s: Setup) -> list[tuple[str, Setup]]:
    """Single changes worth trying when a layout does not fit, in the order a user would reach for them."""
    m, out = s.model, []
    if s.recompute != "full":
        out.append(("train.recompute: full", dataclasses.replace(s, recompute="full")))
    if s.tp > 1 and not s.sequence_parallel and s.backend == "gpu":
        out.append(("parallel.sequence_parallel: true",
                    dataclasses.replace(s, sequence_parallel=True)))
    for pp in (2 * s.pp, 4 * s.pp):
        if m.num_layers % pp == 0:
            out.append((f"parallel.pipeline: {pp}", dataclasses.replace(s, pp=pp)))
    tp = 2 * s.tp
    while tp <= s.gpus_per_node:
        if m.num_attention_heads % tp == 0 and m.num_query_groups % tp == 0 and m.ffn_hidden_size % tp == 0:
            out.append((f"parallel.tensor: {tp}", dataclasses.replace(s, tp=tp)))
        tp *= 2
    mbt = s.micro_batch_tokens // 2
    while mbt >= s.longest:
        out.append((f"train.micro_batch_tokens: {mbt}", dataclasses.replace(s, micro_batch_tokens=mbt)))
        mbt //= 2
    if s.placement == "colocated":
        if not s.engine_sleep:
            out.append(("rollout.sleep_during_training: true",
                        dataclasses.replace(s, engine_sleep=True)))
        for u in (round(s.util - 0.05 * k, 2) for k in range(1, 8)):
            if u > 0.05 and not s.kv_cache_mb:
                out.append((f"rollout.gpu_memory_utilization: {u}", dataclasses.replace(s, util=u)))
    for n in range(s.nodes + 1, 8 * s.nodes + 1):
        out.append((f"--nodes {n} (more data parallelism shards the optimizer)", dataclasses.replace(s, nodes=n)))
    return out


def suggestions(s: Setup, limit: int = 6) -> list[str]:
    found, seen = [], set()
    for label, v in _variations(s):
        key = label.split(":")[0].split(" ")[0]
        if key in seen or layout_errors(v):
            continue
        ok, stages, _ = fits(v)
        if ok:
            seen.add(key)
            found.append(f"{label} -> worst GPU {max(st.total for st in stages) / GIB:.1f} GiB")
        if len(found) >= limit:
            break
    return found


def make_plan(cfg, model: ModelConfig, cluster: Cluster, options: PlanOptions = PlanOptions()) -> Plan:
    """Check and estimate `cfg` (an RLConfig) with `model` on `cluster`. Never raises for a bad layout."""
    s = build_setup(cfg, model, cluster, options)
    plan = Plan(setup=s, ok=False, errors=layout_errors(s))
    r = cfg.rollout
    for key, flag, configured in (("train.recompute", options.recompute, cfg.train.recompute),
                                  ("parallel.sequence_parallel", options.sequence_parallel, cfg.parallel.sequence_parallel),
                                  ("rollout.sleep_during_training", options.engine_sleep, r.sleep_during_training),
                                  ("rollout.engine_nodes", options.engine_nodes, r.engine_nodes)):
        if flag is not None and flag != configured:   # launch.sh passes PLAN_ARGS to the planner alone
            plan.notes_from_flags.append(f"{key} = {flag} comes from a planner flag, the config has {configured}: "
                                         f"the trainer runs with the config's value, so set {key}={flag} in the "
                                         f"config (or as an override)")
    plan.notes += plan.notes_from_flags
    if plan.errors:
        return plan
    try:   # what the trainer itself checks at start-up (future checks included)
        cfg.check_layout(model, s.train_gpus)
    except ValueError as e:
        plan.errors.append(str(e))
        return plan
    ok, plan.stages, plan.engine = fits(s)
    plan.microbatches = microbatches_per_step(s)
    conv = s.tp * s.pp
    plan.convert_nodes, plan.convert_nproc = (1, conv) if conv <= s.gpus_per_node else (conv // s.gpus_per_node, s.gpus_per_node)
    cap = s.gpu_gib * GIB
    for st in plan.stages:
        if st.training_peak + st.engine_train > cap:
            plan.errors.append(f"pipeline stage {st.stage} needs {(st.training_peak + st.engine_train) / GIB:.1f} GiB per "
                               f"GPU while training ({st.training_peak / GIB:.1f} trainer + {st.engine_train / GIB:.1f} "
                               f"engine) but the GPU has {s.gpu_gib:g} GiB")
        if st.rollout_peak > cap:
            plan.errors.append(f"pipeline stage {st.stage} needs {st.rollout_peak / GIB:.1f} GiB per GPU during "
                               f"rollout (trainer state + the engine's gpu_memory_utilization share) but the GPU has "
                               f"{s.gpu_gib:g} GiB: lower rollout.gpu_memory_utilization or shrink the trainer state")
    e = plan.engine
    if e["kv_tokens"] < s.longest and s.kv_cache_mb:
        plan.errors.append(f"rollout.kv_cache_memory_mb = {s.kv_cache_mb} holds KV for {e['kv_tokens']} tokens, "
                           f"fewer than one sequence ({s.longest}): raise it to at least "
                           f"{-(-s.longest * e['kv_per_token'] // MIB)}")
    elif e["kv_tokens"] < s.longest:
        plan.errors.append(f"the vLLM engine's share ({e['share'] / GIB:.1f} GiB = rollout.gpu_memory_utilization "
                           f"{s.util} x {s.gpu_gib:g} GiB) minus its weights ({e['weights'] / GIB:.1f} GiB at engine TP "
                           f"{s.etp}) and workspace leaves KV cache for {e['kv_tokens']} tokens, fewer than one "
                           f"sequence ({s.longest}): raise rollout.gpu_memory_utilization or "
                           f"rollout.engine_tensor_parallel")
    elif e["full_sequences"] < e["per_engine_batch"]:
        plan.notes.append(f"each engine holds KV for {e['full_sequences']} full-length sequences at once, fewer than "
                          f"its {e['per_engine_batch']} per step: vLLM queues the rest (slower rollout, no error)")
    plan.ok = ok and not plan.errors
    if not plan.ok:
        plan.suggestions = suggestions(s)
    return plan


def build_setup(cfg, model: ModelConfig, cluster: Cluster, o: PlanOptions) -> Setup:
    if o.backend not in BACKENDS:
        raise ValueError(f"backend {o.backend!r} is not one of {BACKENDS}")
    for name, v in (("nodes", cluster.nodes), ("gpus_per_node", cluster.gpus_per_node)):
        if v < 1:
            raise ValueError(f"cluster: {name} must be >= 1, got {v}")
    if cluster.gpu_gib <= 0:
        raise ValueError(f"cluster: gpu memory must be > 0 GiB, got {cluster.gpu_gib}")
    r, tr, p = cfg.rollout, cfg.train, cfg.parallel
    recompute = o.recompute or tr.recompute
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute {recompute!r} is not one of {RECOMPUTE}")
    if o.engine_nodes is not None and o.engine_nodes < 0:
        raise ValueError(f"--engine-nodes must be >= 0, got {o.engine_nodes}")
    sp = p.sequence_parallel if o.sequence_parallel is None else o.sequence_parallel
    sleep = r.sleep_during_training if o.engine_sleep is None else o.engine_sleep
    return Setup(
        model=model, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node, gpu_gib=float(cluster.gpu_gib),
        tp=p.tensor, pp=p.pipeline, cp=p.context, placement=r.placement,
        engine_nodes=r.engine_nodes if o.engine_nodes is None else o.engine_nodes,
        etp=r.engine_tensor_parallel, util=r.gpu_memory_utilization, engine_sleep=sleep,
        kv_cache_mb=r.kv_cache_memory_mb,
        engine_bytes=2 if r.dtype == "bfloat16" else 4, act_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
        micro_batch_tokens=tr.micro_batch_tokens, longest=r.max_prompt_length + r.max_response_length,
        sequences=tr.prompts_per_step * r.n_samples, minibatches=tr.minibatches, recompute=recompute,
        sequence_parallel=sp, backend=o.backend, entropy=cfg.loss.entropy_coef > 0,
        sync_bucket_mb=r.weight_sync_bucket_mb,
        reserve_gib=o.reserve_gib if o.reserve_gib is not None else RESERVE_GIB[o.backend],
        fragmentation=o.fragmentation if o.fragmentation is not None else FRAGMENTATION[o.backend],
        engine_overhead_gib=o.engine_overhead_gib, sleep_residual_gib=o.sleep_residual_gib)


# ------------------------------------------------------------------------------------------- model and output

def resolve_model(cfg, name: Optional[str] = None) -> tuple[ModelConfig, str]:
    """The model's ModelConfig: --model (a KNOWN_MODELS name or a path), else the converted checkpoint's
    metadata, else the HF config.json, else a KNOWN_MODELS name matching the configured directory's name."""
    from megatron_rl.convert import to_model_config

    def from_path(path: Path) -> Optional[tuple[ModelConfig, str]]:
        meta_file = path / "megatron_rl_model.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            if "model_config" not in meta:
                raise ValueError(f"{meta_file} holds no `model_config`: not a converted checkpoint's metadata")
            return ModelConfig.from_dict(meta["model_config"]), str(meta_file)
        cj = path if path.suffix == ".json" else path / "config.json"
        if cj.is_file():
            return to_model_config(json.loads(cj.read_text()), dtype="bfloat16"), str(cj)
        return None

    def known(text: str) -> Optional[str]:
        hits = [k for k in KNOWN_MODELS if k.lower() in text.lower()]
        return max(hits, key=len) if hits else None

    if name:
        key = name if name in KNOWN_MODELS else known(Path(name).name)
        found = from_path(Path(name)) or (key and (to_model_config(KNOWN_MODELS[key], dtype="bfloat16"),
                                                     f"published config of {key} (plan.KNOWN_MODELS)"))
        if not found:
            raise ValueError(f"--model {name!r} is neither a readable model directory nor one of {sorted(KNOWN_MODELS)}")
        return found
    for path in (cfg.model.checkpoint, cfg.model.hf_path):
        found = path and from_path(Path(path))
        if found:
            return found
    for path in (cfg.model.hf_path, cfg.model.checkpoint):
        key = path and known(Path(path).name)
        if key:
            return to_model_config(KNOWN_MODELS[key], dtype="bfloat16"), f"published config of {key} (plan.KNOWN_MODELS)"
    raise ValueError(f"cannot read the model: model.checkpoint {cfg.model.checkpoint!r} and model.hf_path "
                     f"{cfg.model.hf_path!r} hold no config here and name none of {sorted(KNOWN_MODELS)}; pass "
                     f"--model with a model directory, a config.json or one of those names")


def format_plan(plan: Plan, model_source: str = "") -> str:
    s, m = plan.setup, plan.setup.model
    g = lambda b: f"{b / GIB:9.2f}"   # noqa: E731
    out = [f"model   {m.family}: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
           f"(KV {m.num_query_groups}), ffn {m.ffn_hidden_size}, vocab {m.vocab_size} (padded "
           f"{m.padded_vocab_size(s.tp)} at TP {s.tp}), {total_params(m) / 1e9:.2f} B params"
           + (f"  [{model_source}]" if model_source else ""),
           f"cluster {s.nodes} nodes x {s.gpus_per_node} GPUs x {s.gpu_gib:g} GiB; backend {s.backend}",
           f"layout  TP {s.tp} x PP {s.pp} x CP {s.cp} x DP {s.dp} = {s.train_gpus} training GPUs; recompute "
           f"{s.recompute}; sequence parallel {'on' if s.sp else 'off'}; rollout {s.placement}, engine TP {s.etp}, "
           f"gpu_memory_utilization {s.util}" + (", engine sleeps while training" if s.engine_sleep else "")]
    if plan.stages:
        head = "".join(f"  stage {st.stage:>3}" for st in plan.stages)
        out += ["", "in flight: " + "; ".join(f"stage {st.stage}: {st.layers} layers x {st.in_flight} microbatch(es) of "
                                               f"{s.micro_batch_tokens // s.cp} tokens" for st in plan.stages),
                f"{'per GPU (GiB)':<74}{head}"]
        for i, (label, _) in enumerate(plan.stages[0].rows):
            out.append(f"{label:<74}" + "".join(f"  {g(st.rows[i][1])}" for st in plan.stages))
        out.append(f"{'= trainer peak':<74}" + "".join(f"  {g(st.training_peak)}" for st in plan.stages))
        if s.placement == "colocated":
            out.append(f"{'+ colocated engine while training':<74}" + "".join(f"  {g(st.engine_train)}" for st in plan.stages))
            out.append(f"{'rollout phase: trainer state + engine share + sync buckets':<74}"
                       + "".join(f"  {g(st.rollout_peak)}" for st in plan.stages))
        out.append(f"{'= peak per GPU':<74}" + "".join(f"  {g(st.total)}" for st in plan.stages))
        out.append(f"{'GPU memory':<74}" + "".join(f"  {g(s.gpu_gib * GIB)}" for _ in plan.stages))
        e = plan.engine
        out += ["", f"engines {e['engines']} x TP {s.etp}: weights {e['weights'] / GIB:.2f} GiB/GPU, share "
                    f"{e['share'] / GIB:.2f} GiB, KV cache {max(e['kv_bytes'], 0) / GIB:.2f} GiB = {e['kv_tokens']} tokens "
                    f"= {e['full_sequences']} full sequences ({e['per_engine_batch']} per engine per step)",
                f"microbatches per DP rank per optimizer step (at most) {plan.microbatches}; conversion on "
                f"{plan.convert_nodes} node(s) x {plan.convert_nproc} processes"]
    out += [f"note: {n}" for n in plan.notes]
    if plan.ok:
        worst = max(plan.stages, key=lambda st: st.total)
        out.append(f"ACCEPTED: worst GPU (stage {worst.stage}) {worst.total / GIB:.1f} of {s.gpu_gib:g} GiB")
    else:
        out += ["REJECTED:"] + [f"  - {e}" for e in plan.errors]
        if plan.suggestions:
            out += ["what would fit (one change each):"] + [f"  * {x}" for x in plan.suggestions]
    return "\n".join(out)


def env_lines(plan: Plan, cfg) -> str:
    """Shell assignments of the resolved layout, for the sbatch launcher (examples/common/launch.sh)."""
    s = plan.setup
    values = {"PLAN_TP": s.tp, "PLAN_PP": s.pp, "PLAN_CP": s.cp, "PLAN_DP": s.dp, "PLAN_WORLD": s.train_gpus,
              "PLAN_TRAIN_NODES": s.train_gpus // s.gpus_per_node, "PLAN_CONVERT_NODES": plan.convert_nodes,
              "PLAN_CONVERT_NPROC": plan.convert_nproc, "PLAN_PLACEMENT": s.placement,
              "PLAN_HF_DIR": cfg.model.hf_path, "PLAN_CKPT_DIR": cfg.model.checkpoint, "PLAN_RUN_DIR": cfg.run_dir,
              "PLAN_RESUME": cfg.checkpoint.resume}
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())


def plan_main(argv: Optional[list[str]] = None) -> int:
    """`megatron-rl plan`: 0 = accepted, 1 = rejected (reasons printed), 2 = bad arguments or config."""
    p = argparse.ArgumentParser(prog="megatron-rl plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the job's YAML config")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU")
    p.add_argument("--model", help="model dir, config.json or a known name (default: from the config)")
    p.add_argument("--backend", choices=BACKENDS, default="gpu")
    # these four override config keys for exploring; the trainer runs with the config (the plan notes a
    # difference, and with --emit-env, i.e. when launching, refuses it)
    p.add_argument("--recompute", choices=RECOMPUTE, help="default: train.recompute")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="default: parallel.sequence_parallel")
    p.add_argument("--engine-sleep", action=argparse.BooleanOptionalAction, default=None,
                   help="default: rollout.sleep_during_training")
    p.add_argument("--engine-nodes", type=int, help="disaggregated: nodes for the vLLM engines "
                   "(default: rollout.engine_nodes)")
    p.add_argument("--reserve-gib", type=float, help="CUDA context + NCCL + workspaces per GPU (gpu default 3)")
    p.add_argument("--fragmentation", type=float, help="allocator slack on dynamic memory (gpu default 0.10)")
    p.add_argument("--emit-env", help="write the resolved layout as shell assignments here (when accepted)")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides (as for train)")
    a = p.parse_args(argv)
    from megatron_rl.trainer.config import load_rl_config

    try:
        cfg = load_rl_config(a.config, a.overrides)
        model, source = resolve_model(cfg, a.model)
        opts = PlanOptions(backend=a.backend, recompute=a.recompute, sequence_parallel=a.sequence_parallel,
                           engine_sleep=a.engine_sleep, engine_nodes=a.engine_nodes, reserve_gib=a.reserve_gib,
                           fragmentation=a.fragmentation)
        plan = make_plan(cfg, model, Cluster(a.nodes, a.gpus_per_node, a.gpu_memory), opts)
    except ValueError as e:
        print(f"megatron-rl plan: error: {e}", file=sys.stderr)
        return 2
    if a.emit_env and plan.notes_from_flags:   # launching: the job must run exactly what was planned
        print("megatron-rl plan: error: planner flags differ from the config the job runs with: "
              + "; ".join(plan.notes_from_flags), file=sys.stderr)
        return 2
    print(f"megatron-rl plan: {a.config}")
    print(format_plan(plan, source))
    if plan.ok and a.emit_env:
        Path(a.emit_env).write_text(env_lines(plan, cfg))
    return 0 if plan.ok else 1


if __name__ == "__main__":
    sys.exit(plan_main())
