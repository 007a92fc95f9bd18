"""The layout and memory planner: `megatron-rl plan --config FILE --nodes N --gpus-per-node G --gpu-memory GiB`.

Before a SLURM allocation is spent: checks that the job's parallel layout can exist on the cluster (TP
divides heads and KV heads, PP divides layers, world = TP x PP x CP x DP, engines fit a node, the rollout
batch splits over DP), then estimates one GPU's peak memory per pipeline stage term by term (weights,
gradients, distributed-optimizer state, activations with the configured recompute, the loss's logits, the
colocated vLLM engine) and refuses a layout that does not fit, naming what to change. Every term, its
assumption and its source is written out in docs/planner.md; the comments here say why, not what.

    plan = make_plan(cfg, model_cfg, Cluster(nodes=8, gpus_per_node=8, gpu_gib=80))
    print(format_plan(plan)); plan.ok

Pure Python: importing this module needs no torch (the CLI's config loader does, through the loss config).
Settings RLConfig does not have yet (recompute, sequence parallelism, engine sleep, engine nodes) are read
with getattr defaults from the config, so this works before and after they are added, and are flags too.
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

GIB = 2 ** 30
MIB = 2 ** 20

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

BACKENDS = ("gpu", "cpu")   # gpu: transformer-engine layer spec + flash attention; cpu: megatron's local spec
RECOMPUTE = ("none", "selective", "full")
# Defaults per backend. gpu reserve: CUDA context (~0.5 GiB), NCCL communicators of the TP/PP/DP groups and
# cuBLAS/TE workspaces; fragmentation: the caching allocator's slack on the dynamic (activation) memory.
_RESERVE_GIB = {"gpu": 3.0, "cpu": 0.0}
_FRAGMENTATION = {"gpu": 0.10, "cpu": 0.0}
# megatron_rl.parallel.vocab_parallel.DEFAULT_CHUNK_BYTES (the loss's fp32 work buffers), copied rather than
# imported so that planning needs nothing beyond the config; tests/trainer/test_plan.py checks they agree.
DEFAULT_CHUNK_BYTES = 2 ** 20


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_gib: float


@dataclass(frozen=True)
class PlanOptions:
    """Planner-only settings; None = from the config (getattr default) or the backend's default."""
    backend: str = "gpu"
    recompute: Optional[str] = None            # none | selective | full
    sequence_parallel: Optional[bool] = None
    engine_sleep: Optional[bool] = None        # colocated engine offloads weights / drops KV while training
    engine_nodes: Optional[int] = None         # disaggregated: nodes given to the vLLM engines
    reserve_gib: Optional[float] = None
    fragmentation: Optional[float] = None
    engine_overhead_gib: float = 2.0           # vLLM's activation / sampler workspace beside weights + KV cache
    sleep_residual_gib: float = 1.0            # what a sleeping engine keeps on the GPU (its CUDA context)


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on, resolved from config + cluster + options (a variation is a replace)."""
    model: ModelConfig
    nodes: int
    gpus_per_node: int
    gpu_gib: float
    tp: int
    pp: int
    cp: int
    placement: str
    engine_nodes: int
    etp: int
    util: float
    kv_cache_mb: Optional[int]  # rollout.kv_cache_memory_mb: a fixed KV cache instead of the util share
    engine_sleep: bool
    engine_bytes: int          # vLLM weight / KV-cache dtype bytes
    act_bytes: int             # training activation dtype bytes (bf16 2, fp32 4)
    micro_batch_tokens: int
    longest: int               # max_prompt_length + max_response_length
    sequences: int             # prompts_per_step x n_samples
    minibatches: int
    recompute: str
    sequence_parallel: bool
    backend: str
    entropy: bool
    sync_bucket_mb: int
    reserve_gib: float
    fragmentation: float
    engine_overhead_gib: float
    sleep_residual_gib: float

    @property
    def train_gpus(self) -> int:
        return (self.nodes - (self.engine_nodes if self.placement == "disaggregated" else 0)) * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.train_gpus // (self.tp * self.pp * self.cp)

    @property
    def sp(self) -> bool:   # megatron ignores sequence parallelism at TP 1
        return self.sequence_parallel and self.tp > 1


@dataclass
class StageMemory:
    stage: int
    layers: int
    params: int
    in_flight: int
    rows: list = field(default_factory=list)   # (label, bytes) in table order
    training_peak: int = 0                     # the trainer process alone
    engine_train: int = 0                      # colocated engine memory while the trainer runs
    rollout_peak: int = 0                      # during rollout: trainer resident + engine share + sync

    @property
    def total(self) -> int:
        return max(self.training_peak + self.engine_train, self.rollout_peak)


@dataclass
class Plan:
    setup: Setup
    ok: bool
    errors: list[str]
    stages: list[StageMemory] = field(default_factory=list)
    engine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    microbatches: int = 0
    convert_nodes: int = 0
    convert_nproc: int = 0


# ------------------------------------------------------------------------------------------- parameters

def layer_params(m: ModelConfig, tp: int = 1) -> int:
    """One decoder layer's parameters on one TP rank (norm weights are replicated on every rank)."""
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    sharded = m.hidden_size * qkv + m.num_attention_heads * m.head_dim * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size
    sharded += qkv if m.add_qkv_bias else 0
    replicated = 2 * m.hidden_size + (2 * m.head_dim if m.qk_layernorm else 0)
    return sharded // tp + replicated


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage `stage` (Megatron's padded vocabulary)."""
    n = (m.num_layers // pp) * layer_params(m, tp)
    embed = m.padded_vocab_size(tp) // tp * m.hidden_size
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += m.hidden_size                       # final norm
        if not m.tie_word_embeddings or pp > 1:  # output layer; tied at PP > 1 the last stage keeps a copy
            n += embed
    return n


def total_params(m: ModelConfig) -> int:
    """The model's parameter count as HF counts it (unpadded vocabulary, tied embeddings once)."""
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * layer_params(m) + m.hidden_size + embed * (1 if m.tie_word_embeddings else 2)


# ------------------------------------------------------------------------------------------- activations

def layer_activation_bytes(s: Setup, tokens: int, recompute: Optional[str] = None) -> int:
    """Bytes one decoder layer keeps for backward, for one microbatch of `tokens` tokens on one rank.

    The tensors autograd saves in megatron-core's layer as megatron_rl builds it (no dropout, SwiGLU with
    bias_activation_fusion off, unfused RoPE), counted the way Korthikanti et al. 2022 count theirs.
    """
    m, B, t = s.model, s.act_bytes, s.tp
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    recompute = recompute or s.recompute
    seq_shard = t if s.sp else 1                      # SP shards the norm region along the sequence
    if recompute == "full":                           # only the layer's input is checkpointed
        return tokens * B * h // seq_shard
    if s.backend == "gpu":   # TE LayerNormLinear saves its input, ln_out and fp32 rsigma
        norms = 2 * (2 * B * h + 4) // seq_shard
        attn = (2 * a + 2 * g) * d * B // t + 4 * a // t             # Q, K, V (GQA heads), O; fp32 softmax lse
        qk_norm = ((a + g) * d * B + 4 * (a + g)) // t if m.qk_layernorm else 0
    else:                    # torch RMSNorm (composite, fp32 math): x.float(), rsqrt, x*rsqrt, output
        norms = 2 * ((8 + B) * h + 4)
        if recompute == "selective":                  # the checkpoint keeps q, k, v (GQA heads) and O
            attn = (2 * a + 2 * g) * d * B // t
        else:   # K, V repeated to all heads; scores softmaxed in fp32 (+ a bf16 copy for the bmm)
            attn = 4 * a * d * B // t + a * tokens * (4 + (B if B < 4 else 0)) // t
        qk_norm = (((8 + B) * d + 4) * (a + g)) // t if m.qk_layernorm else 0
    rope = 4 * d * B                                  # cos / sin for q and k, computed per layer
    mlp = 5 * f * B // t                              # fc1 out (2f), silu out, linear half + offset, product
    return tokens * (norms + attn + qk_norm + rope + mlp)


def backward_working_set(s: Setup, tokens: int) -> int:
    """The largest transient of one layer's backward: the MLP's activation gradients plus one weight
    gradient before it is added to the fp32 main grad (gradient_accumulation_fusion is off), or the
    attention's: dQ, dK, dV, dO (flash) / the fp32 gradients of the scores and probabilities (unfused)."""
    m, B, t = s.model, s.act_bytes, s.tp
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    mlp = tokens * 3 * f * B // t + 2 * f * h * B // t
    if s.backend == "gpu":
        attn = tokens * (2 * a + 2 * g) * d * B // t
    else:
        attn = 2 * (a // t) * tokens * tokens * 4
    return max(mlp, attn)


def microbatches_per_step(s: Setup) -> int:
    """Microbatches per DP rank per optimizer step when every sequence has the maximum length (the most)."""
    per_rank = max(1, s.sequences // (s.minibatches * max(s.dp, 1)))
    per_mb = max(1, s.micro_batch_tokens // max(s.longest, 1))
    return -(-per_rank // per_mb)


def stage_memory(s: Setup, stage: int) -> StageMemory:
    m, B, t = s.model, s.act_bytes, s.tp
    tokens = s.micro_batch_tokens // s.cp
    n_mb = microbatches_per_step(s)
    # 1F1B: stage i holds up to PP - i microbatches' activations (never more than there are microbatches)
    in_flight = min(s.pp - stage, n_mb)
    first, last = stage == 0, stage == s.pp - 1
    layers = m.num_layers // s.pp
    params = stage_params(m, t, s.pp, stage)
    dp_shard = s.dp * s.cp                            # the distributed optimizer shards over DP x CP
    bf16 = B == 2
    rows = [(f"weights ({'bf16' if bf16 else 'fp32'}, {2 if bf16 else 4} B/param)", params * (2 if bf16 else 4)),
            ("main grads (fp32, 4 B/param)", params * 4),
            (f"optimizer ({'fp32 master + ' if bf16 else ''}Adam m, v: {12 if bf16 else 8} B/param / DP x CP {dp_shard})",
             params * (12 if bf16 else 8) // dp_shard)]
    if s.backend == "cpu":   # megatron's persistent global buffer for the unfused QK^T (reused by every layer)
        rows.append(("attention score buffer (unfused)", m.num_attention_heads // t * tokens * tokens * B))
    act = in_flight * layers * layer_activation_bytes(s, tokens)
    if s.recompute == "full":                         # one layer is rematerialised at a time during backward
        act += layer_activation_bytes(s, tokens, recompute="none")
    rows.append((f"activations (recompute {s.recompute}, SP {'on' if s.sp else 'off'}, 1F1B in flight)", act))
    extra = in_flight * tokens * 16 if first else 0   # token and position ids (int64)
    if s.backend == "cpu":
        extra += in_flight * tokens * tokens          # the block-diagonal bool attention mask
    if not last:                                      # outputs kept until their backward (no deallocation)
        extra += in_flight * tokens * B * m.hidden_size // (t if s.sp else 1)
    else:                                             # final norm (its output is the output layer's input)
        extra += tokens * ((2 * B * m.hidden_size + 4) // (t if s.sp else 1) if s.backend == "gpu"
                           else (8 + B) * m.hidden_size + 4)
    rows.append(("inputs, pipeline buffers, final norm", extra))
    loss = 0
    if last:   # vocab_parallel._LogProbs: fp32 logits [s, V/tp] saved for backward, an fp32 gradient of the
        width = m.padded_vocab_size(t) // t        # same shape, and chunked work buffers (entropy: two)
        n = tokens * width
        chunk = min(tokens, max(1, DEFAULT_CHUNK_BYTES // (4 * width) // (2 if s.entropy else 1)))
        work = chunk * width * 4
        loss = max(8 * n + (work if s.entropy else 0),          # backward: logits + gradient (+ entropy buffer)
                   4 * n + (2 * n if bf16 else 0),               # forward: the bf16 output and its fp32 copy
                   4 * n + work * (2 if s.entropy else 1))       # forward pass of the loss
    rows.append(("logits + loss (last stage: fp32 logits + fp32 grad)", loss))
    # gradients of one layer's tensors exist while that layer's backward runs; on the last stage the
    # loss's buffers are gone by then, so only the excess over them counts
    ws = backward_working_set(s, tokens)
    rows.append(("backward working set (one layer)", max(0, ws - loss) if last else ws))
    dynamic = act + extra + loss + rows[-1][1]
    rows.append((f"fragmentation ({s.fragmentation:.0%} of dynamic)", int(dynamic * s.fragmentation)))
    rows.append(("CUDA context, NCCL, workspaces (reserve)", int(s.reserve_gib * GIB)))
    sm = StageMemory(stage, layers, params, in_flight, rows)
    sm.training_peak = sum(b for _, b in rows)
    resident = sum(b for _, b in rows[:3]) + int(s.reserve_gib * GIB)
    if s.placement == "colocated":
        share = int(engine_estimate(s)["share"])
        sm.engine_train = int(s.sleep_residual_gib * GIB) if s.engine_sleep else share
        # rollout: the trainer keeps weights, grads and optimizer (activations freed and the cache emptied)
        # while the engine takes its share and weight sync gathers buckets of full tensors
        sm.rollout_peak = resident + share + 2 * s.sync_bucket_mb * MIB
    return sm


def engine_estimate(s: Setup) -> dict:
    """vLLM engine memory per GPU: weights / engine TP + workspace; the rest of its share is KV cache."""
    m = s.model
    weights = total_params(m) * s.engine_bytes // s.etp
    kv_heads = max(1, m.num_query_groups // s.etp)   # vLLM replicates KV heads when engine TP > KV heads
    kv_per_token = 2 * m.num_layers * kv_heads * m.head_dim * s.engine_bytes
    if s.kv_cache_mb:    # vLLM's kv_cache_memory_bytes: the engine takes what it needs, no more
        kv = s.kv_cache_mb * MIB
        share = weights + s.engine_overhead_gib * GIB + kv
    else:
        share = s.util * s.gpu_gib * GIB
        kv = share - weights - s.engine_overhead_gib * GIB
    engines = (s.engine_nodes if s.placement == "disaggregated" else s.nodes) * s.gpus_per_node // s.etp
    return {"weights": weights, "share": share, "kv_bytes": kv, "kv_per_token": kv_per_token,
            "kv_tokens": int(max(kv, 0) // kv_per_token), "engines": engines,
            "full_sequences": int(max(kv, 0) // kv_per_token // max(s.longest, 1)),
            "per_engine_batch": -(-s.sequences // max(engines, 1))}


# ------------------------------------------------------------------------------------------- checks

def layout_errors(s: Setup) -> list[str]:
    """Everything that makes the layout impossible, each naming the setting to change."""
    m, errs, G = s.model, [], s.gpus_per_node
    try:
        m.check_parallel(s.tp, s.pp)
    except ValueError as e:
        errs.append(f"parallel.tensor / parallel.pipeline: {e}")
    if s.placement == "disaggregated" and not 0 < s.engine_nodes < s.nodes:
        errs.append(f"rollout.placement disaggregated needs 0 < engine nodes < nodes; got {s.engine_nodes} engine "
                    f"nodes of {s.nodes} (flag --engine-nodes, proposed config key rollout.engine_nodes)")
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


def _fits(s: Setup) -> tuple[bool, list[StageMemory], dict]:
    stages = [stage_memory(s, i) for i in sorted({0, s.pp - 1})]
    eng = engine_estimate(s)
    cap = s.gpu_gib * GIB
    ok = all(st.total <= cap for st in stages) and eng["kv_tokens"] >= s.longest
    return ok, stages, eng


def _variations(s: Setup) -> list[tuple[str, Setup]]:
    """Single changes worth trying when a layout does not fit, in the order a user would reach for them."""
    m, out = s.model, []
    if s.recompute != "full":
        out.append(("train.recompute: full (proposed key; planner flag --recompute full)", dataclasses.replace(s, recompute="full")))
    if s.tp > 1 and not s.sequence_parallel and s.backend == "gpu":
        out.append(("parallel.sequence_parallel: true (proposed key; flag --sequence-parallel)",
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
            out.append(("rollout.enable_sleep_mode: true (proposed key; flag --engine-sleep)",
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
        ok, stages, _ = _fits(v)
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
    for key, value in (("train.recompute", s.recompute), ("parallel.sequence_parallel", s.sequence_parallel),
                       ("rollout.enable_sleep_mode", s.engine_sleep)):
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section), name) and value not in ("none", False):
            plan.notes.append(f"{key} = {value} comes from a planner flag: RLConfig has no `{key}` yet, so the "
                              f"trainer does not apply it; the estimate assumes it does")
    if plan.errors:
        return plan
    try:   # what the trainer itself checks at start-up (future checks included)
        cfg.check_layout(model, s.train_gpus)
    except ValueError as e:
        plan.errors.append(str(e))
        return plan
    ok, plan.stages, plan.engine = _fits(s)
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
    recompute = o.recompute or getattr(tr, "recompute", None) or "none"
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r} is not one of {RECOMPUTE}")
    sp = o.sequence_parallel if o.sequence_parallel is not None else bool(getattr(p, "sequence_parallel", False))
    sleep = o.engine_sleep if o.engine_sleep is not None else bool(getattr(r, "enable_sleep_mode", False))
    return Setup(
        model=model, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node, gpu_gib=float(cluster.gpu_gib),
        tp=p.tensor, pp=p.pipeline, cp=p.context, placement=r.placement,
        engine_nodes=o.engine_nodes if o.engine_nodes is not None else int(getattr(r, "engine_nodes", 0)),
        etp=r.engine_tensor_parallel, util=r.gpu_memory_utilization, engine_sleep=sleep,
        kv_cache_mb=getattr(r, "kv_cache_memory_mb", None),
        engine_bytes=2 if r.dtype == "bfloat16" else 4, act_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
        micro_batch_tokens=tr.micro_batch_tokens, longest=r.max_prompt_length + r.max_response_length,
        sequences=tr.prompts_per_step * r.n_samples, minibatches=tr.minibatches, recompute=recompute,
        sequence_parallel=sp, backend=o.backend, entropy=cfg.loss.entropy_coef > 0,
        sync_bucket_mb=r.weight_sync_bucket_mb,
        reserve_gib=o.reserve_gib if o.reserve_gib is not None else _RESERVE_GIB[o.backend],
        fragmentation=o.fragmentation if o.fragmentation is not None else _FRAGMENTATION[o.backend],
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
    p.add_argument("--recompute", choices=RECOMPUTE, help="default: train.recompute, else none")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--engine-sleep", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--engine-nodes", type=int, help="disaggregated: nodes for the vLLM engines")
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
    print(f"megatron-rl plan: {a.config}")
    print(format_plan(plan, source))
    if plan.ok and a.emit_env:
        Path(a.emit_env).write_text(env_lines(plan, cfg))
    return 0 if plan.ok else 1


if __name__ == "__main__":
    sys.exit(plan_main())
