"""One training step (forward, backward, distributed optimizer) is layout- and split-invariant.

Reference: TP1 PP1 DP1, one microbatch. Every other (TP, PP, DP) layout and 1 / 2 / 4 microbatches must
give the same loss (rtol 1e-5), grad norm (rtol 1e-5) and updated parameters (|diff| <= 2e-6 with
lr 1e-3, fp32, Adam eps 1e-4, clipping at 1.0 active), for ppo, dppo_binary_tv, dppo_topk_kl and cppo
(top-K TV, horizon `sequence`). Adam eps is 1e-4 rather than 1e-8 because the first Adam step is
g / (|g| + eps): with eps 1e-8 a gradient of 1e-9 (fp32 reduction-order noise) moves a weight by a
full lr. Plus: anchor `old` with 2 minibatches (pi_old recomputed once, fixed across both optimizer
steps), and bf16 (Float16Module) against the fp32 reference.

Tied embeddings (a Qwen2-like model without QK-norm, two cases per layout, compared with the same case
at TP1 PP1): at PP > 1 the first stage's embedding and the last stage's output layer are two copies.
Megatron syncs them at start-up (all-reduce over the embedding group, reached on CPU through
patches/megatron_cpu.py P9) and sums their gradients in finalize_model_grads. Checked: the copies start
equal and non-zero (megatron's own init, before ours overwrites it), every parameter's gradient at every
optimizer step equals the reference's (DP 1, where the whole grad buffer is reduced), the copies are
bit-equal after the optimizer steps, and the updated tied weight equals the reference's. At DP 1 the
trained model is exported to HF (export_hf): the parent reloads it in transformers, tied, with
embed_tokens equal to the trained weight and the Megatron model's logits.

Launches: one process for the reference (also packed == unpacked logits), one of 2 ranks for
(2,1,1), (1,2,1), (1,1,2), one of 4 ranks for (2,2,1), (2,1,2), (1,2,2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

from .common import MAX_RESPONSE, make_samples, model_cfg, pipeline_logits

MODES = ("ppo", "dppo_binary_tv", "dppo_topk_kl", "cppo")
MICROBATCHES = (1, 2, 4)
LR, EPS = 1e-3, 1e-4
PARAM_ATOL = 2e-6
BUDGET = 160
# tied model: (mode, microbatches, minibatches, bf16); 4 microbatches fill the PP 2 pipeline, "old" takes
# two optimizer steps (the second one's gradients depend on both copies having moved alike)
TIED_CASES = (("ppo", 4, 1, False), ("old", 2, 2, False))
EXPORT_CASE = ("old", 2, 2, False)
# |grad - reference grad| (max |grad| 0.06): fp32 reduction-order noise measured <= 9e-8; leaving the tied
# copies' grads unsummed at PP 2 (finalize_model_grads' all-reduce disabled) gives 4.5e-2
GRAD_ATOL = 1e-6
LOGIT_TOL = 1e-5       # HF (transformers) vs Megatron logits of the exported model, fp32
EXPORT_TOKENS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))


def _cases():
    cases = [(mode, n, 1, False) for mode in MODES for n in MICROBATCHES]
    cases.append(("old", 2, 2, False))    # anchor = pi_old, 2 optimizer steps on one rollout batch
    cases.append(("ppo", 2, 1, True))     # bf16 params, fp32 main params and grads
    return cases


def _models():
    """(tied, model config, cases). The tied model drops QK-norm: HF Qwen2 has none, so it exports."""
    return [(False, model_cfg(), _cases()),
            (True, model_cfg(tie_word_embeddings=True, qk_layernorm=False), TIED_CASES)]


def _ref_case(tied, case):
    """The reference run's key (at TP1 PP1 DP1) a case is compared with: untied, the case with the fewest
    microbatches it allows (layouts AND splits are compared); tied, the same case."""
    mode, nmb, nminib, bf16 = case
    if tied:
        return (True,) + case
    return (False, mode, 2 if mode == "old" or bf16 else 1, nminib, bf16)


def _loss_cfg(mode):
    from megatron_rl.losses.config import LossConfig

    from .common import loss_cfgs
    if mode == "old":
        return LossConfig(mode="dppo_binary_tv", anchor="old")
    return loss_cfgs()[mode]


def _run_case(cfg, ps, mode, nmb, nminib, bf16, samples):
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.policy import logprob_fn, policy_loss_fn
    from megatron_rl.megatron.step import Actor, StepConfig, shard_for_dp
    from megatron_rl.megatron.training import OptimConfig, build_training, unwrap

    extra = {}
    tied = cfg.tie_word_embeddings

    def init(model):
        if tied:   # megatron's own init, synced across the copies while the model was built
            extra["start_gap"] = _tied_copies_gap(model, ps)
        init_params_(model, cfg, ps, seed=1)

    chunks, opt = build_training(cfg, ps, OptimConfig(lr=LR, adam_eps=EPS, clip_grad=1.0, bf16=bf16), init=init)
    if tied and ps.dp == 1:
        _record_grads(chunks, opt, extra.setdefault("grads", []))
    actor = Actor(cfg, ps, chunks, opt, StepConfig(microbatch_tokens=BUDGET, num_microbatches=nmb,
                                                   num_minibatches=nminib, max_response_length=MAX_RESPONSE),
                  policy_loss_fn(cfg, ps, _loss_cfg(mode)))
    local = shard_for_dp(samples, nminib, ps.dp, ps.dp_rank)
    if mode == "old":
        old = actor.compute_logprobs(local, logprob_fn(cfg, ps))
        if ps.is_last_stage:
            local = [dataclasses.replace(s, old_logprobs=o) for s, o in zip(local, old)]
            extra["old"] = [o.clone() for o in old]
    metrics = actor.train_on_rollout(local)
    if mode == "old":
        after = actor.compute_logprobs(local, logprob_fn(cfg, ps))   # every stage runs the pipeline
        if ps.is_last_stage:
            # the anchor is a field of the samples: untouched by the optimizer steps
            assert all(torch.equal(s.old_logprobs, o) for s, o in zip(local, extra["old"]))
            extra["moved"] = max(float((a - o).abs().max()) for a, o in zip(after, extra["old"]))
    if tied:
        extra["end_gap"] = _tied_copies_gap(unwrap(chunks[0]), ps)
    return chunks, metrics, extra


def _tied_copies_gap(model, ps):
    """(max |first stage's embedding - last stage's output-layer copy|, max |last stage's copy|) of this
    TP rank's shard, on the embedding group's ranks at PP > 1; None elsewhere (at PP 1 there is one
    tensor)."""
    import torch.distributed as dist

    if ps.pp == 1 or not (ps.is_first_stage or ps.is_last_stage):
        return None
    weight = model.shared_embedding_or_output_weight().detach().float().contiguous()
    group = ps.pg_collection.embd    # [first stage rank, last stage rank] of this TP / DP position
    parts = [torch.empty_like(weight) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, weight, group=group)
    return float((parts[0] - parts[-1]).abs().max()), float(parts[-1].abs().max())


def _record_grads(chunks, opt, into: list) -> None:
    """Append every parameter's main_grad (local name -> copy) at each optimizer step, just before it:
    after finalize_model_grads (DP reduce, tied-copy all-reduce), before clipping scales them in place.
    DP 1 only: with the distributed optimizer a DP rank's buffer is reduced only over its own shard."""
    from megatron_rl.megatron.training import unwrap

    model, step = unwrap(chunks[0]), opt.step

    def recording_step():
        into.append({n: p.main_grad.detach().float().clone() for n, p in model.named_parameters()})
        return step()

    opt.step = recording_step


def _export(model, cfg, ps, out_dir: Path):
    """Export the trained stage to HF; returns what the parent checks the export against: the trained
    tied weight (full, unpadded; first stage) and the Megatron logits of EXPORT_TOKENS (every rank)."""
    from megatron_rl.megatron.hf_checkpoint import export_hf, gather_tp

    export_hf(model, cfg, ps, out_dir, out_dir.parent)   # (no tokenizer files there: none copied)
    logits = pipeline_logits(model, ps, EXPORT_TOKENS, cfg.padded_vocab_size(ps.tp))[..., :cfg.vocab_size]
    weight = None
    if ps.is_first_stage:
        weight = torch.cat(gather_tp(model.embedding.word_embeddings.weight, ps))[:cfg.vocab_size].clone()
    return {"dir": str(out_dir), "logits": logits, "weight": weight}


def packed_vs_unpacked(cfg, ps):
    """Max |logit difference| between 3 sequences packed in one row and each run alone."""
    from megatron_rl.megatron.init import init_params_
    from megatron_rl.megatron.model import build_model
    from megatron_rl.megatron.packing import pack

    model = build_model(cfg, ps)
    init_params_(model, cfg, ps, seed=1)
    model.eval()
    samples = make_samples(n=3, seed=7)
    mb = pack(samples, [0, 1, 2], BUDGET)
    with torch.no_grad():
        packed = model(mb.tokens, mb.position_ids, mb.attention_mask)[0]
        worst, bounds = 0.0, mb.cu_seqlens.tolist()
        for j, s in enumerate(samples):
            L = s.length
            alone = model(s.tokens[None], torch.arange(L)[None], None)[0]
            worst = max(worst, float((packed[bounds[j]:bounds[j] + L] - alone).abs().max()))
    return worst


def body(rank, world, layouts, ref, export_root=None):
    from megatron_rl.megatron.init import canonical_name, shard_of_full
    from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_rl.megatron.training import unwrap

    samples = make_samples()
    out = {}
    for tp, pp in layouts:
        ps = initialize_parallel(tp=tp, pp=pp, model_cfg=model_cfg())   # (the tied model: same shape)
        if world == 1:
            out["packed_vs_unpacked"] = packed_vs_unpacked(model_cfg(), ps)
        for tied, cfg, cases in _models():
            for case in cases:
                chunks, metrics, extra = _run_case(cfg, ps, *case, samples)
                model = unwrap(chunks[0])
                params = list(model.named_parameters())
                if tied and case == EXPORT_CASE and ps.dp == 1 and export_root is not None:
                    extra["export"] = _export(model, cfg, ps, Path(export_root) / f"tied_tp{tp}_pp{pp}")
                key = (tp, pp, ps.dp, tied) + case
                if ref is None:
                    out[key] = (metrics, {canonical_name(n, cfg, ps): p.detach().float().clone() for n, p in params},
                                extra)
                    continue
                r_metrics, r_params, r_extra = ref[_ref_case(tied, case)]
                diff = 0.0
                for n, p in params:
                    want = shard_of_full(n, r_params[canonical_name(n, cfg, ps)], cfg, ps)
                    diff = max(diff, float((p.detach().float() - want).abs().max()))
                if "grads" in extra:   # per optimizer step, every local parameter vs the reference's
                    gaps = {}
                    for mine, theirs in zip(extra.pop("grads"), r_extra["grads"], strict=True):
                        for n, p in params:
                            g = canonical_name(n, cfg, ps)
                            gap = float((mine[n] - shard_of_full(n, theirs[g], cfg, ps)).abs().max())
                            gaps[g] = max(gaps.get(g, 0.0), gap)
                    extra["grad_gaps"] = gaps
                out[key] = (metrics, r_metrics, diff, extra)
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    exports = tmp_path_factory.mktemp("exports")
    res = run_ranks(body, 1, args=([(1, 1)], None, str(exports)), timeout=300)[0]
    packed_gap = res.pop("packed_vs_unpacked")
    assert packed_gap < 1e-5, packed_gap   # block-diagonal causal mask, positions running on: exact
    ref = {key[3:]: v for key, v in res.items()}    # (tied, mode, nmb, nminib, bf16) -> result
    return ref, res


def _check_tied(key, extra):
    tp, pp, dp = key[:3]
    if pp > 1:
        # start-up: the last stage's zero-filled copy got the first stage's (non-zero) init
        (start_gap, start_max), (end_gap, end_max) = extra["start_gap"], extra["end_gap"]
        assert start_gap == 0.0 and start_max > 1e-3, (key, extra["start_gap"])
        assert end_gap == 0.0 and end_max > 1e-3, (key, extra["end_gap"])   # moved alike: bit-equal
    else:
        assert extra["start_gap"] is None and extra["end_gap"] is None, key
    if dp == 1:
        gaps = extra["grad_gaps"]
        assert "embedding.word_embeddings.weight" in gaps, (key, sorted(gaps))   # both copies map to it
        assert max(gaps.values()) <= GRAD_ATOL, (key, {g: v for g, v in gaps.items() if v > GRAD_ATOL})


def _check(per_rank):
    """Every rank's view of every case (a rank checks its own parameter shard)."""
    results = [(k, v) for res in per_rank for k, v in res.items()]
    assert len(results) == len(per_rank) * 3 * (len(_cases()) + len(TIED_CASES))
    for key, (metrics, r_metrics, diff, extra) in results:
        bf16 = key[-1]
        rtol = 2e-2 if bf16 else 1e-5
        for m, r in zip(metrics, r_metrics, strict=True):
            assert m["num_tokens"] == r["num_tokens"] and m["num_sequences"] == r["num_sequences"], key
            assert m["loss"] == pytest.approx(r["loss"], rel=rtol, abs=1e-6), (key, m, r)
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=rtol), (key, m, r)
        # bf16: within a few bf16 ulps of weights of size ~0.02-1.1 (2^-8 relative)
        assert diff <= (1e-2 if bf16 else PARAM_ATOL), (key, diff)
        if key[3]:
            _check_tied(key, extra)
    _check_exports(per_rank)


def _check_exports(per_rank):
    """Each layout's HF export of the trained tied model reloads in transformers tied, with embed_tokens
    equal to the trained weight and the logits of the Megatron model that wrote it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    by_dir = {}
    for res in per_rank:
        for key, value in res.items():
            if "export" in value[-1]:
                by_dir.setdefault(value[-1]["export"]["dir"], []).append(value[-1]["export"])
    assert by_dir, "no export"
    for path, parts in by_dir.items():
        weights = [p["weight"] for p in parts if p["weight"] is not None]
        assert weights and all(torch.equal(w, weights[0]) for w in weights), path
        names = set()
        for f in Path(path).glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                names.update(fh.keys())
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names, (path, sorted(names))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert model.config.tie_word_embeddings, path
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), path
        assert torch.equal(model.model.embed_tokens.weight, weights[0]), path
        with torch.no_grad():
            hf = model(EXPORT_TOKENS).logits
        for p in parts:
            gap = float((hf - p["logits"]).abs().max())
            assert gap <= LOGIT_TOL, (path, gap)


def test_reference_is_nontrivial_and_split_invariant(reference):
    ref, res = reference
    for (tp, pp, dp, tied, *case), (metrics, params, extra) in res.items():
        r_metrics, r_params, _ = ref[_ref_case(tied, tuple(case))]
        for m, r in zip(metrics, r_metrics):
            assert m["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), case
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), case
        assert max(float((params[k] - r_params[k]).abs().max()) for k in params) <= PARAM_ATOL, case
        assert all(m["update_successful"] and m["grad_norm"] > 0 for m in metrics)
    # the modes really differ (their masks are active on this data) and the optimizer really moved
    losses = {m: ref[_ref_case(False, (m, 1, 1, False))][0][0]["loss"] for m in MODES}
    assert len({round(v, 6) for v in losses.values()}) == len(MODES), losses
    old_metrics, _, old_extra = ref[_ref_case(False, ("old", 2, 2, False))]
    assert len(old_metrics) == 2 and old_metrics[1]["iteration"] == 2
    assert old_extra["moved"] > 1e-4   # parameters moved, yet the anchor stayed the pre-update pi_old
    # tied: one tensor at PP 1 whose gradient (embedding + output layer) is recorded at every step
    tied_metrics, _, tied_extra = ref[(True,) + EXPORT_CASE]
    assert len(tied_extra["grads"]) == len(tied_metrics) == 2 and tied_extra["moved"] > 1e-4
    assert "output_layer.weight" not in tied_extra["grads"][0]
    assert float(tied_extra["grads"][0]["embedding.word_embeddings.weight"].abs().max()) > 1e-3
    _check_exports([res])


def test_layouts_world2(reference, tmp_path):
    ref, _ = reference
    _check(run_ranks(body, 2, args=([(2, 1), (1, 2), (1, 1)], ref, str(tmp_path)), timeout=400))


def test_layouts_world4(reference, tmp_path):
    ref, _ = reference
    _check(run_ranks(body, 4, args=([(2, 2), (2, 1), (1, 2)], ref, str(tmp_path)), timeout=500))
