"""Methods that run inside vLLM's worker, next to the model (vLLM mixes this class into its Worker).

The engine passes `worker_extension_cls="megatron_rl.rollout.worker_ext.WeightSyncExtension"`, so the
driver calls these by name through `LLM.collective_rpc("mrl_...", args=...)`. Calling by name means no
function is pickled, so VLLM_ALLOW_INSECURE_SERIALIZATION is not needed; every argument and result is
bytes, str, numbers, lists or dicts, which vLLM's multiprocess transport carries (raw tensors it does not).

Tensors travel as safetensors bytes, named in HF checkpoint naming on both sides. Reading back: vLLM
fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (the model's `packed_modules_mapping` says
which), so an HF name resolves to a slice of the fused parameter (split by the layer's `output_sizes`).
On CPU vLLM repacks linear weights for oneDNN and leaves an EMPTY `weight` parameter behind; the only
handle on the weight is then the layer's `cpu_linear`, so we read it by multiplying the identity
(exact: every output element is one product w * 1 plus zeros).
"""

from __future__ import annotations

from typing import Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# rows of the identity pushed through a repacked linear at once (bounds the probe's memory)
_PROBE_CHUNK = 1024


def _probe_linear(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight of a CPU-repacked linear layer, recovered as cpu_linear(I)^T."""
    k = int(module.input_size_per_partition)
    cols = []
    for start in range(0, k, _PROBE_CHUNK):
        c = min(_PROBE_CHUNK, k - start)
        eye = torch.zeros(c, k, dtype=weight.dtype)
        eye[torch.arange(c), start + torch.arange(c)] = 1
        cols.append(module.cpu_linear(eye, weight, None))   # [c, out] = W[:, start:start+c]^T
    return torch.cat(cols, dim=0).t().contiguous()


class EngineWeightReader:
    """HF-named views of a vLLM model's parameters (tensor parallel size 1)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.packed = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
        self.sub_to_packed = {sub: (packed, i) for packed, subs in self.packed.items() for i, sub in enumerate(subs)}
        self._full_cache: dict[str, Optional[torch.Tensor]] = {}

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

    def _full(self, module_path: str, leaf: str) -> Optional[torch.Tensor]:
        key = f"{module_path}.{leaf}"
        if key in self._full_cache:
            return self._full_cache[key]
        try:
            module = self.model.get_submodule(module_path)
        except AttributeError:
            module = None
        p = getattr(module, leaf, None) if module is not None else None
        if not isinstance(p, torch.Tensor):
            out = None
        else:
            if getattr(module, "tp_size", 1) != 1:
                raise NotImplementedError("reading engine weights supports tensor_parallel_size=1 only")
            if leaf == "weight" and p.numel() == 0 and hasattr(module, "cpu_linear"):
                out = _probe_linear(module, p)
            else:
                out = p.detach()
                org = getattr(module, "org_vocab_size", None)   # vocab rows padded by vLLM
                if org is not None and out.dim() == 2 and out.shape[0] > org:
                    out = out[:org]
        self._full_cache[key] = out
        return out

    def get(self, hf_name: str) -> Optional[torch.Tensor]:
        """The engine's tensor for `hf_name`, or None when the engine has no such parameter."""
        module_path, _, leaf = hf_name.rpartition(".")
        parent, _, mod = module_path.rpartition(".")
        if mod in self.sub_to_packed:
            packed, shard = self.sub_to_packed[mod]
            fused_path = f"{parent}.{packed}" if parent else packed
            full = self._full(fused_path, leaf)
            if full is None:
                return None
            sizes = [int(s) for s in self.model.get_submodule(fused_path).output_sizes]
            if sum(sizes) != full.shape[0]:
                raise RuntimeError(f"{fused_path}.{leaf}: fused size {full.shape[0]} != sum of output_sizes {sizes}")
            return full.split(sizes, dim=0)[shard]
        return self._full(module_path, leaf)


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
        return len(tensors)

    def mrl_compare_weights(self, payload: bytes) -> dict:
        """Max |engine - expected| per HF name, the expected tensor cast to the engine's dtype first
        (that cast is what loading does). Names the engine lacks go to `missing`, shape clashes to `shape`."""
        expected = st_load(payload)
        reader = EngineWeightReader(self._mrl_model())
        diffs, missing, shapes = {}, [], {}
        with torch.no_grad():
            for name, want in expected.items():
                got = reader.get(name)
                if got is None:
                    missing.append(name)
                elif tuple(got.shape) != tuple(want.shape):
                    shapes[name] = [list(got.shape), list(want.shape)]
                else:
                    want = want.to(device=got.device, dtype=got.dtype)
                    diffs[name] = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
        return {"diffs": diffs, "missing": missing, "shapes": shapes}

    def mrl_read_weights(self, names: Optional[list] = None) -> bytes:
        """The engine's weights in HF naming as safetensors bytes (all of them when `names` is None)."""
        reader = EngineWeightReader(self._mrl_model())
        out = {}
        with torch.no_grad():
            for name in (names if names is not None else reader.hf_names()):
                t = reader.get(name)
                if t is not None:
                    out[name] = t.detach().to("cpu").contiguous().clone()
        return st_save(out)

    def mrl_param_names(self) -> list:
        """Every engine parameter in HF naming (a fused parameter lists its parts)."""
        return EngineWeightReader(self._mrl_model()).hf_names()
