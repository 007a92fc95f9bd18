"""Build a megatron-core GPTModel (one pipeline stage) from a ModelConfig.

API (for the conversion engineer and the trainer):

    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.model import build_model, resolve_use_te, transformer_config

    ps = initialize_parallel(tp=2, pp=1, cp=1, seed=1234, model_cfg=cfg)  # after init_process_group
    model = build_model(cfg, ps)                      # bare GPTModel for this rank's stage, fp32
    model = build_model(cfg, ps, params_dtype="bfloat16")   # bf16 parameters (wrap with Float16Module
                                                      # through megatron_rl.megatron.training instead)
    model = build_model(cfg, ps, recompute="full", sequence_parallel=True)   # activation memory options
    use_te = resolve_use_te(None)                     # the layer spec, decided once per process...
    model = build_model(cfg, ps, use_te=use_te)       # ...and given to the model and to step.Actor alike
    state = model.state_dict()                        # megatron names: embedding.word_embeddings.weight,
                                                      # decoder.layers.{i}.self_attention.linear_qkv.weight
                                                      # (local layer indices per stage), output_layer.weight...
    layer_offset(cfg, ps)                             # global index of this stage's first layer

Vocabulary: the embedding / output layer have `cfg.padded_vocab_size(ps.tp)` rows (Megatron pads; the
loss ignores ids >= cfg.vocab_size).

Layer spec (`resolve_use_te`): the transformer-engine spec when CUDA is available AND transformer_engine
is installed, megatron-core's local spec otherwise (CPU, or a bare PyTorch GPU image); use_te=True / False
forces one (True refuses a machine without CUDA or TE). Both specs train the same model: the TE spec takes
packed rows as THD (cu_seqlens), the local spec as a block-diagonal causal mask (step.Actor picks the
path from the spec it is given, never from CUDA). Only sequence parallelism and context-parallel
attention need the TE spec (`check_layer_spec`). The local spec runs on GPU too: parameters are created
on the CPU only when CUDA is absent, and the model moves to the current CUDA device otherwise.

RoPE: theta, and HF rope_scaling of type `linear` or `llama3` with all of its parameters (Megatron's own
llama3 switch hard-codes three of them), by overwriting the rotary embedding's inverse frequencies after
construction.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rl.model_config import ModelConfig
from megatron_rl.patches import megatron_cpu

from .parallel import ParallelState

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECOMPUTE = ("none", "selective", "full")   # activation recompute (train.recompute)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies in fp32, with HF's rope_scaling semantics (`linear`, `llama3`)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between interpolated
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, mid))
    else:
        raise ValueError(f"model config: `rope_scaling` type {kind!r} is not supported; "
                         f"supported: default, linear, llama3")
    return inv_freq.to(torch.float32)


def transformer_engine_installed() -> bool:
    """Whether transformer_engine can be imported, looked up without importing it (its import loads
    CUDA libraries and is slow; a CPU process must never pay for it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_use_te(use_te: Optional[bool] = None) -> bool:
    """The layer spec to build: True = transformer-engine, False = megatron-core's local spec.

    None picks TE exactly when CUDA is available and transformer_engine is installed, so a bare
    PyTorch GPU image gets the local spec (block-diagonal masks for packed rows) rather than a model
    it cannot build. True is refused where TE cannot run, naming what to change."""
    if use_te is None:
        return torch.cuda.is_available() and transformer_engine_installed()
    if not use_te:
        return False
    if not torch.cuda.is_available():
        raise ValueError("use_te=True: the transformer-engine layer spec needs CUDA and none is available; "
                         "pass use_te=False (or None) for megatron-core's local spec")
    if not transformer_engine_installed():
        raise ValueError("use_te=True: transformer_engine is not installed (importlib finds no "
                         "`transformer_engine`); install it (pip install -e '.[gpu]') or pass use_te=False "
                         "(or None) for megatron-core's local spec")
    return True


def check_layer_spec(use_te: bool, *, sequence_parallel: bool = False, cp: int = 1) -> None:
    """Refuse the features only the transformer-engine spec has (start-up, before any model exists)."""
    if sequence_parallel and not use_te:
        # the local spec's torch norm asserts on sequence-parallel input (docs: platform.md)
        raise ValueError("sequence_parallel needs the transformer-engine layer spec on GPU (CUDA and "
                         "transformer_engine installed); the local spec cannot run it: set "
                         "parallel.sequence_parallel: false")
    if cp > 1 and not use_te:
        # the local spec's core attention sees only this rank's chunk of the row: no ring exchange
        raise ValueError(f"context-parallel attention (parallel.context = {cp}) needs the transformer-engine "
                         f"layer spec on GPU (CUDA and transformer_engine installed); the local spec has no "
                         f"context-parallel attention: set parallel.context: 1")


def check_memory_options(ps: ParallelState, use_te: bool, recompute: str, sequence_parallel: bool) -> None:
    """Refuse activation-memory and parallelism settings this layout or layer spec cannot run (before any
    model exists)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {RECOMPUTE} (config: train.recompute)")
    if sequence_parallel and ps.tp < 2:
        raise ValueError(f"sequence_parallel needs tensor_model_parallel_size > 1, got {ps.tp} "
                         f"(config: parallel.sequence_parallel, parallel.tensor)")
    check_layer_spec(use_te, sequence_parallel=sequence_parallel, cp=ps.cp)


def transformer_config(cfg: ModelConfig, ps: ParallelState, *, params_dtype: Optional[str] = None,
                       bf16: bool = False, init_method_std: float = 0.02, use_te: Optional[bool] = None,
                       recompute: str = "none", sequence_parallel: bool = False):
    """The megatron TransformerConfig for `cfg` under layout `ps` (dropout off: RL fine-tuning).

    recompute: `none`; `selective` (megatron's core-attention checkpoint: the attention scores and
    probabilities are recomputed in backward); `full` (every layer's input is checkpointed and the whole
    layer recomputed, one layer per unit). Gradients are the same either way (tests/megatron/test_recompute.py).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_parallel(tp=ps.tp, pp=ps.pp)
    on_gpu = torch.cuda.is_available()
    use_te = resolve_use_te(use_te)
    check_memory_options(ps, use_te, recompute, sequence_parallel)
    granularity = None if recompute == "none" else recompute
    dtype = _DTYPES[params_dtype or ("bfloat16" if bf16 else "float32")]
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim, normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=init_method_std,
        tensor_model_parallel_size=ps.tp, pipeline_model_parallel_size=ps.pp,
        context_parallel_size=ps.cp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16 or dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu, perform_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # microbatches are padded to one fixed token budget, so p2p shapes are static
        variable_seq_lengths=False, deallocate_pipeline_outputs=False,
        recompute_granularity=granularity,
        recompute_method="uniform" if granularity == "full" else None,
        recompute_num_layers=1 if granularity == "full" else None,
        # explicit rather than megatron's default, which may change between versions
        recompute_modules=["core_attn"] if granularity == "selective" else None,
    )


def layer_offset(cfg: ModelConfig, ps: ParallelState) -> int:
    return ps.pp_rank * (cfg.num_layers // ps.pp)


def build_model(cfg: ModelConfig, ps: ParallelState, *, params_dtype: Optional[str] = None,
                bf16: bool = False, use_te: Optional[bool] = None, init_method_std: float = 0.02,
                recompute: str = "none", sequence_parallel: bool = False):
    """This rank's pipeline stage of a GPTModel for `cfg`. Deterministic given `ps.seed`.

    use_te: the layer spec (see resolve_use_te); whoever runs the model must take packed rows the way
    this spec does (step.Actor(use_te=...)), so callers resolve it once and pass the bool to both.

    On CPU the init runs on the CPU generator seeded here, so every layout builds the same full
    weights (megatron's CPU init draws the master weight then slices this rank's part).
    """
    megatron_cpu.apply()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    on_gpu = torch.cuda.is_available()
    use_te = resolve_use_te(use_te)
    config = transformer_config(cfg, ps, params_dtype=params_dtype, bf16=bf16, use_te=use_te,
                                init_method_std=init_method_std, recompute=recompute,
                                sequence_parallel=sequence_parallel)
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    # Same init on every layout: the stage's layers draw from a generator advanced identically.
    torch.manual_seed(ps.seed)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=cfg.padded_vocab_size(ps.tp),
        max_sequence_length=cfg.max_position_embeddings, pre_process=ps.is_first_stage,
        post_process=ps.is_last_stage, parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=cfg.rope_theta,
        pg_collection=ps.pg_collection)
    model.rotary_pos_emb.inv_freq = rope_inv_freq(cfg).to(model.rotary_pos_emb.inv_freq.device)
    if on_gpu:   # either spec: the local one runs on CUDA too (a GPU without transformer-engine)
        model.cuda(torch.cuda.current_device())
    return model
