"""Methods that run inside vLLM's worker, next to the model (vLLM mixes this class into its Worker).

The engine passes `worker_extension_cls="megatron_rl.rollout.worker_ext.WeightSyncExtension"`, so the
driver calls these by name through `LLM.collective_rpc("mrl_...", args=...)`. Calling by name means no
function is pickled, so VLLM_ALLOW_INSECURE_SERIALIZATION is not needed; every argument and result is
bytes, str, numbers, lists or dicts, which vLLM's multiprocess transport carries (raw tensors it does not).

Tensors travel as safetensors bytes, named in HF checkpoint naming on both sides. Reading back: vLLM
fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (the model's `packed_modules_mapping` says
which), so an HF name resolves to a slice of the fused parameter (split by the layer's per-rank
`output_partition_sizes`). With tensor parallelism every worker is called at once and answers for its
own slice only, with a ShardLayout placing it in the full HF tensor; the driver merges the answers.
On CPU vLLM repacks linear weights for oneDNN and leaves an EMPTY `weight` parameter behind; the only
handle on the weight is then the layer's `cpu_linear`, so we read it by multiplying the identity
(exact: every output element is one product w * 1 plus zeros).
"""

from __future__ import annotations

from typing import Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from vllm.model_executor.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from megatron_rl.rollout.weight_sync import ShardLayout

# rows of the identity pushed through a repacked linear at once (bounds the probe's memory)
_PROBE_CHUNK = 1024


def _probe_linear(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight of a CPU-repacked linear layer, recovered as cpu_linear(I)^T."""
    k = int(getattr(module, "input_size_per_partition", None) or module.input_size)   # Replicated: no split
    cols = []
    for start in range(0, k, _PROBE_CHUNK):
        c = min(_PROBE_CHUNK, k - start)
        eye = torch.zeros(c, k, dtype=weight.dtype)
        eye[torch.arange(c), start + torch.arange(c)] = 1
        cols.append(module.cpu_linear(eye, weight, None))   # [c, out] = W[:, start:start+c]^T
    return torch.cat(cols, dim=0).t().contiguous()


class EngineWeightReader:
    """HF-named views of this worker's parameters, each with the ShardLayout that places it in the full
    HF tensor (None: it is the whole tensor, as everywhere at tensor_parallel_size 1).

    At TP > 1 a worker holds the slice its layer's vLLM weight_loader cut, found from the layer's own
    attributes (vllm/model_executor/layers/linear.py, vocab_parallel_embedding.py):
    - ColumnParallelLinear (incl. fused QKV / MergedColumn): rows split by rank, per sub-matrix
      (`output_partition_sizes`); QKV's k and v rows are shared by `num_kv_head_replicas` consecutive
      ranks when there are fewer KV heads than ranks; the bias is split like the rows.
    - RowParallelLinear: weight columns split (`input_size_per_partition`); the bias is whole.
    - VocabParallelEmbedding / ParallelLMHead: vocabulary rows per `shard_indices`; the padding rows
      after them hold no HF row and are dropped (at TP 1 too).
    - ReplicatedLinear and modules without tp_size > 1 (norms): whole.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.packed = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
        self.sub_to_packed = {sub: (packed, i) for packed, subs in self.packed.items() for i, sub in enumerate(subs)}
        self._local_cache: dict[str, Optional[torch.Tensor]] = {}
        self._shared = _shared_owners(model)    # once per reader, not once per compared name

    def hf_names(self) -> list[str]:
        names = []
        for pname, _ in self.model.named_parameters():
            module_path, _, leaf = pname.rpartition(".")
            parent, _, mod = module_path.rpartition(".")
            if mod in self.packed:
                names += [f"{parent}.{sub}.{leaf}" if parent else f"{sub}.{leaf}" for sub in self.packed[mod]]
            else:
                names.append(pname)
        return names

    def _module(self, module_path: str) -> Optional[torch.nn.Module]:
        try:
            return self.model.get_submodule(module_path)
        except AttributeError:
            return None

    def _local(self, module_path: str, leaf: str) -> Optional[torch.Tensor]:
        """This worker's tensor of `module_path.leaf` (the fused one for a fused module)."""
        key = f"{module_path}.{leaf}"
        if key in self._local_cache:
            return self._local_cache[key]
        module = self._module(module_path)
        p = getattr(module, leaf, None) if module is not None else None
        if not isinstance(p, torch.Tensor):
            out = None
        elif leaf == "weight" and p.numel() == 0 and hasattr(module, "cpu_linear"):
            out = _probe_linear(module, p)
        else:
            out = p.detach()
            idx = getattr(module, "shard_indices", None)   # vocab rows: this rank's, then padding
            org = (idx.org_vocab_end_index - idx.org_vocab_start_index) if idx is not None \
                else getattr(module, "org_vocab_size", None)
            if org is not None and out.dim() >= 1 and out.shape[0] > org:
                out = out[:org]
        self._local_cache[key] = out
        return out

    def derived(self, hf_name: str) -> list[tuple[str, torch.Tensor]]:
        """The copies other modules derived from parameter `hf_name` (a tied LM head's repacked CPU
        weight), by the alias's own name: a read-back of the shared parameter alone cannot see them."""
        module_path, _, leaf = hf_name.rpartition(".")
        out = []
        for modules in self._shared:
            if leaf != "weight" or module_path not in {m for m, _ in modules}:
                continue
            for mname, module in modules:
                if mname != module_path and hasattr(module, "cpu_linear"):
                    idx = module.shard_indices   # this rank's vocabulary rows, then padding (no HF row)
                    rows = idx.org_vocab_end_index - idx.org_vocab_start_index
                    out.append((f"{mname}.weight", _probe_linear(module, module.weight)[:rows]))
        return out

    def get(self, hf_name: str) -> Optional[tuple[torch.Tensor, Optional[ShardLayout]]]:
        """This worker's part of `hf_name` and where it sits in the full tensor (None: it is all of it),
        or None when the engine has no such parameter."""
        module_path, _, leaf = hf_name.rpartition(".")
        parent, _, mod = module_path.rpartition(".")
        if mod not in self.sub_to_packed:
            t = self._local(module_path, leaf)
            return None if t is None else (t, _layout(self._module(module_path), hf_name, leaf, t, None))
        packed, sub = self.sub_to_packed[mod]
        fused_path = f"{parent}.{packed}" if parent else packed
        fused = self._local(fused_path, leaf)
        if fused is None:
            return None
        module = self._module(fused_path)
        # per-rank sizes of the sub-matrices (at TP 1 they equal output_sizes)
        parts = [int(s) for s in getattr(module, "output_partition_sizes", None) or module.output_sizes]
        if sum(parts) != fused.shape[0]:
            raise RuntimeError(f"{fused_path}.{leaf}: fused size {fused.shape[0]} != sum of the per-rank "
                               f"output_partition_sizes {parts}")
        part = fused.narrow(0, sum(parts[:sub]), parts[sub])
        return part, _layout(module, hf_name, leaf, part, sub)


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max()) if got.numel() else 0.0


def _layout(module: torch.nn.Module, hf_name: str, leaf: str, local: torch.Tensor,
            sub: Optional[int]) -> Optional[ShardLayout]:
    """Where `local` (sub-matrix `sub` of a fused module, or the whole parameter) sits in the HF tensor."""
    tp = int(getattr(module, "tp_size", 1) or 1)
    if tp == 1 or isinstance(module, ReplicatedLinear):   # the latter keeps the group's tp_size
        return None
    rank = int(module.tp_rank)

    def unsupported(why: str):
        raise NotImplementedError(
            f"reading back {hf_name!r} at tensor_parallel_size={tp}: {why}; the weight check cannot place "
            "this worker's slice, so turn it off (rollout.weight_check=never) for this model")

    if isinstance(module, VocabParallelEmbedding):
        return ShardLayout(0, int(module.shard_indices.org_vocab_start_index), int(module.org_vocab_size))
    if leaf not in ("weight", "bias"):
        unsupported(f"parameter {leaf!r} of {type(module).__name__} (quantized layouts are not handled)")
    if isinstance(module, ColumnParallelLinear):
        if sub is None and len(module.output_partition_sizes) > 1:
            unsupported(f"{type(module).__name__} is fused in the checkpoint too, so a rank's rows are not "
                        "one block of it")
        # QKVParallelLinear.weight_loader: q rows by tp_rank, k / v rows by tp_rank // num_kv_head_replicas
        replicas = int(module.num_kv_head_replicas) if isinstance(module, QKVParallelLinear) and sub else 1
        rows = local.shape[0]
        return ShardLayout(0, (rank // replicas) * rows, rows * (tp // replicas))
    if isinstance(module, RowParallelLinear):
        if leaf == "bias":   # not split: each rank holds it (only rank 0 adds it)
            return None
        cols = local.shape[1]
        return ShardLayout(1, rank * cols, cols * tp)
    unsupported(f"{type(module).__name__} is sharded in a way this reader does not know")


def _refresh_tied_aliases(model: torch.nn.Module, loaded: dict) -> None:
    """Re-derive what other modules built from a shared parameter that was just loaded.

    A tied model's LM head holds the embedding's own Parameter (vLLM's `tie_weights`), and the checkpoint
    has no `lm_head.weight`, so the layer-wise reload only ever processes the embedding. The shared
    tensor itself is updated in place, but what the head derived from it at start-up is not: on CPU its
    quant method repacked the weight into `cpu_linear` (oneDNN), and that stale copy kept scoring tokens
    with the OLD output projection while a parameter read-back saw the new weight. So every module
    holding a loaded parameter without being its module in the checkpoint is processed again (on GPU the
    unquantized head derives nothing, and this re-runs a no-op)."""
    loaded_modules = {name.rpartition(".")[0] for name in loaded}
    for modules in _shared_owners(model):
        if not loaded_modules & {m for m, _ in modules}:
            continue
        for mname, module in modules:
            method = getattr(module, "quant_method", None)
            if mname not in loaded_modules and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)


def _shared_owners(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """For each parameter held by more than one module (tied embeddings), its (module path, module)s."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, module))
    return [mods for mods in owners.values() if len(mods) > 1]


class WeightSyncExtension:
    """Mixed into vLLM's Worker: `self` is the worker (has `model_runner`, `reload_weights`)."""

    def _mrl_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def mrl_load_weights(self, payload: bytes) -> int:
        """Load one bucket (safetensors bytes, HF names) in place; returns the number of tensors.

        vLLM's layer-wise reload processes a module once all its elements arrived and rebuilds any
        module left partly loaded from uninitialised memory, so the caller must send whole fused
        groups per call (weight_sync.plan_buckets does).
        """
        tensors = st_load(payload)
        self.reload_weights(weights_iterator=iter(tensors.items()))
        _refresh_tied_aliases(self._mrl_model(), tensors)
        return len(tensors)

    def mrl_compare_weights(self, payload: bytes) -> dict:
        """Max |engine - expected| per HF name over this worker's slice, the expected tensor cast to the
        engine's dtype first (that cast is what loading does). Names the engine lacks go to `missing`,
        shape clashes (the full shape this worker's slice implies vs the expected one) to `shape`.
        The driver merges the workers' answers (weight_sync.merge_worker_checks)."""
        expected = st_load(payload)
        reader = EngineWeightReader(self._mrl_model())
        diffs, missing, shapes = {}, [], {}
        with torch.no_grad():
            for name, want in expected.items():
                got = reader.get(name)
                if got is None:
                    missing.append(name)
                    continue
                local, layout = got
                full_shape = tuple(local.shape) if layout is None else layout.full_shape(local.shape)
                if full_shape != tuple(want.shape):
                    shapes[name] = [list(full_shape), list(want.shape)]
                    continue
                if layout is not None:
                    want = layout.slice(want, local.shape)
                want = want.to(device=local.device, dtype=local.dtype)
                diffs[name] = _max_diff(local, want)
                for alias, copy in reader.derived(name):   # e.g. a tied head's repacked weight
                    diffs[alias] = _max_diff(copy, want)
        return {"diffs": diffs, "missing": missing, "shapes": shapes}

    def mrl_read_weights(self, names: Optional[list] = None) -> dict:
        """This worker's weights in HF naming: {"tensors": safetensors bytes, "layouts": {name: ShardLayout
        as a list, or None when whole}} (all names when `names` is None); weight_sync.read_engine_weights
        puts the workers' slices together."""
        reader = EngineWeightReader(self._mrl_model())
        out, layouts = {}, {}
        with torch.no_grad():
            for name in (names if names is not None else reader.hf_names()):
                got = reader.get(name)
                if got is not None:
                    out[name] = got[0].detach().to("cpu").contiguous().clone()
                    layouts[name] = None if got[1] is None else list(got[1])
        return {"tensors": st_save(out), "layouts": layouts}

    def mrl_param_names(self) -> list:
        """Every engine parameter in HF naming (a fused parameter lists its parts)."""
        return EngineWeightReader(self._mrl_model()).hf_names()
