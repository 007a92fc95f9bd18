"""The planner's memory model: one GPU's peak memory per pipeline stage, term by term.

    s = Setup(...)                     # resolved by plan.build_setup from config + cluster + options
    stages, engine = [stage_memory(s, i) for i in (0, s.pp - 1)], engine_estimate(s)

Weights, gradients, distributed-optimizer state, activations with the configured recompute and sequence
parallelism, the loss's logits, the colocated vLLM engine. Every term, its assumption and its source is
written out in docs/planner.md; the comments here say why, not what. Pure Python (no torch): the
planner runs on a login node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_rl.model_config import ModelConfig

GIB = 2 ** 30
MIB = 2 ** 20

BACKENDS = ("gpu", "cpu")   # gpu: transformer-engine layer spec + flash attention; cpu: megatron's local spec
RECOMPUTE = ("none", "selective", "full")
# Defaults per backend. gpu reserve: CUDA context (~0.5 GiB), NCCL communicators of the TP/PP/DP groups and
# cuBLAS/TE workspaces; fragmentation: the caching allocator's slack on the dynamic (activation) memory.
RESERVE_GIB = {"gpu": 3.0, "cpu": 0.0}
FRAGMENTATION = {"gpu": 0.10, "cpu": 0.0}
# megatron_rl.parallel.vocab_parallel.CHUNK_BYTES (the loss's fp32 work-buffer budget per device: cuda for
# gpu), copied rather than imported so that planning needs nothing beyond the config;
# tests/trainer/test_plan.py checks they agree.
CHUNK_BYTES = {"gpu": 2 ** 28, "cpu": 2 ** 20}


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
        chunk = min(tokens, max(1, CHUNK_BYTES[s.backend] // (4 * width) // (2 if s.entropy else 1)))
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


def fits(s: Setup) -> tuple[bool, list[StageMemory], dict]:
    """(every GPU fits and the engine holds one sequence, the first and last stages, the engine estimate)."""
    stages = [stage_memory(s, i) for i in sorted({0, s.pp - 1})]
    eng = engine_estimate(s)
    cap = s.gpu_gib * GIB
    ok = all(st.total <= cap for st in stages) and eng["kv_tokens"] >= s.longest
    return ok, stages, eng

