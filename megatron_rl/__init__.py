"""megatron_rl: DPPO / CPPO trust-region policy losses for RLVR on Megatron-core.

Layers (imports flow downward only; tests/test_layering.py enforces it):

    trainer                      RLVR actor-learner loop; nothing imports it
    megatron | rollout           the only importers of megatron.core | vllm
    parallel | convert           torch.distributed autograd functions | HF <-> Megatron mappings
    losses | rewards | utils     pure math on local per-token tensors | verifiers | helpers
"""

__version__ = "0.1.0"
