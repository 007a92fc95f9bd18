"""Start-up checks, packing and RoPE scaling: in-process, no process group, no megatron model.

- Bad configs fail before anything is built, with an error naming the setting: TP not dividing the
  attention heads or the KV heads, PP not dividing the layers, a microbatch token budget smaller than
  the longest sequence (also after CP padding), a CP budget that is not a multiple of 2 * cp.
- Packing: whole sequences only, every sequence exactly once, within the budget; labels and per-token
  fields shifted so that position j holds token j + 1's values; the block-diagonal causal mask.
- rope_inv_freq: llama3 scaling equals transformers' implementation; linear divides by the factor.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rl.megatron.packing import TrainingSample

from .common import model_cfg, validate_setup


@pytest.mark.parametrize("tp,pp,match", [
    (4, 1, "tensor_model_parallel_size=4 does not divide num_attention_heads"),
    (3, 1, "tensor_model_parallel_size=3 does not divide num_query_groups"),
    (1, 3, "pipeline_model_parallel_size=3 .*does not divide num_layers"),
])
def test_bad_layout_fails_at_startup_naming_the_setting(tp, pp, match):
    from megatron_rl.megatron.parallel import initialize_parallel
    from megatron_rl.megatron.step import StepConfig

    cfg = model_cfg(num_attention_heads=6, num_query_groups=2, hidden_size=96)
    with pytest.raises(ValueError, match=match):
        validate_setup(cfg, StepConfig(microbatch_tokens=64), 32, tp=tp, pp=pp)
    with pytest.raises(ValueError, match=match):     # before any process group is needed
        initialize_parallel(tp=tp, pp=pp, model_cfg=cfg)


def test_budget_smaller_than_longest_sequence_fails_naming_the_setting():
    from megatron_rl.megatron.packing import pack_batch
    from megatron_rl.megatron.step import StepConfig

    cfg = model_cfg()
    with pytest.raises(ValueError, match="microbatch_tokens=32 is smaller than the longest sequence"):
        validate_setup(cfg, StepConfig(microbatch_tokens=32), 33)
    with pytest.raises(ValueError, match="microbatch_tokens=36 is smaller .*after CP padding"):
        validate_setup(cfg, StepConfig(microbatch_tokens=36), 37, cp=2)
    with pytest.raises(ValueError, match="multiple of 2 x context_parallel_size=4"):
        validate_setup(cfg, StepConfig(microbatch_tokens=36), 20, cp=4)
    with pytest.raises(ValueError, match="microbatch_tokens=8 is smaller"):
        pack_batch([TrainingSample(torch.arange(9))], 8)
    validate_setup(cfg, StepConfig(microbatch_tokens=33), 33)


def test_packing_keeps_sequences_whole_and_shifts_fields():
    from megatron_rl.megatron.packing import causal_block_mask, pack_batch, plan_microbatches

    lengths = [5, 9, 3, 7, 2, 8]
    samples = [TrainingSample(torch.arange(L) + 100 * i, loss_mask=torch.ones(L),
                              advantages=torch.arange(L, dtype=torch.float32) + 100 * i)
               for i, L in enumerate(lengths)]
    for n in (None, 2, 3):
        plan = plan_microbatches(lengths, 20, n)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 20 for b in plan)
        if n is not None:
            assert len(plan) == n
        mbs = pack_batch(samples, 20, n)
        for mb in mbs:
            cu = mb.cu_seqlens.tolist()
            for j, i in enumerate(mb.seq_ids.tolist()):
                a, L = cu[j], lengths[i]
                assert cu[j + 1] - a == L
                assert torch.equal(mb.tokens[0, a:a + L], samples[i].tokens)
                assert torch.equal(mb.labels[0, a:a + L - 1], samples[i].tokens[1:])
                assert torch.equal(mb.fields["advantages"][0, a:a + L - 1], samples[i].advantages[1:])
                assert mb.fields["loss_mask"][0, a + L - 1] == 0   # the last token predicts nothing
            assert mb.fields["loss_mask"][0, cu[-1]:].sum() == 0     # padding tail
    with pytest.raises(ValueError, match="do not fit in num_microbatches=1"):
        plan_microbatches(lengths, 20, 1)
    mask = causal_block_mask(torch.tensor([0, 2, 5]), 6)[0, 0]
    allowed = ~mask
    assert allowed[1, 0] and not allowed[2, 1] and allowed[4, 2] and not allowed[2, 4]
    assert allowed[5, 5] and not allowed[5, 4]          # the padding tail attends only within itself


def test_row_cu_seqlens_cover_the_row_with_the_padding_tail():
    from megatron_rl.megatron.packing import pack_batch, row_cu_seqlens, split_for_cp

    part, full = (pack_batch([TrainingSample(torch.arange(n)) for n in lengths], 12, pad_multiple=4)[0]
                  for lengths in ([3, 4], [6, 3]))
    assert row_cu_seqlens(part).tolist() == [0, 4, 8, 12] and row_cu_seqlens(part).dtype == torch.int64
    assert row_cu_seqlens(full).tolist() == [0, 8, 12, 12]     # a full row: an empty tail (no device read)
    cp = split_for_cp(part, 2, 0)
    assert cp.cu_seqlens.tolist() == [0, 4, 8, 12] and row_cu_seqlens(cp).tolist() == [0, 4, 8, 12]


def test_rope_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_rl.megatron.model import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512}
    cfg = model_cfg(family="llama", rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=4096)
    hf = transformers.LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                                  rope_theta=cfg.rope_theta, rope_scaling=scaling,
                                  max_position_embeddings=4096)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), want.float(), rtol=1e-6, atol=0)
    lin = model_cfg(rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope_inv_freq(lin), rope_inv_freq(model_cfg()) / 4.0)
    with pytest.raises(ValueError, match="rope_scaling"):
        rope_inv_freq(model_cfg(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
