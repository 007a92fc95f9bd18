"""The megatron-core adapter: the only place (with megatron_rl.patches) that imports megatron.core.

    parallel.py     init_world (the one process-group start-up), agree (every rank raises alike),
                    ParallelState bundle, initialize_parallel (wraps megatron's parallel_state, once)
    model.py        build_model: GPTModel from a ModelConfig (local spec on CPU, TE spec on GPU)
    init.py         layout-independent deterministic init; TP shard of a full tensor
    training.py     Float16Module + DDP + distributed optimizer (OptimConfig, build_training)
    packing.py      whole sequences into token-budget microbatch rows (THD cu_seqlens; CPU block mask)
    step.py         Actor: forward_step, THE loss adapter, minibatches, global counts
    policy.py       loss functions for the Actor (policy losses over vocab-parallel logits)
    checkpoint.py   atomic dist-checkpointing with bit-exact resume
    hf_checkpoint.py  HF <-> Megatron weights (the conversion engineer's)
"""
