"""Run megatron-core on CPU with gloo: runtime patches, applied only when CUDA is absent (except P8).

Upstream versions: written against megatron-core 0.16.1 and 0.19.2 (both tested by tests/megatron);
other versions get a warning. Drop this module once megatron-core runs its training path on a CPU
device (it assumes CUDA throughout: see docs of each patch below).

Scope, so that nothing outside megatron-core changes behaviour: megatron-core modules see a proxy
in place of their module-global `torch` (installed on every `megatron.core.*` module, including those
imported later, through an import hook). The proxy forwards everything to torch except:

  P1 `torch.cuda.current_device()` -> the CPU device. ~175 call sites build tensors with
     `device=torch.cuda.current_device()` (attention's global memory buffer, p2p shapes, DDP buffers).
  P2 factory functions called with `device="cuda"` (zeros, tensor, empty, ...) -> CPU. The pipeline
     schedules (all three) hard-code `torch.zeros(..., device="cuda")`; so do grad clipping, the
     optimizers and dist-checkpointing.
  P3 `torch.cuda.synchronize`, `empty_cache` -> no-ops; `Stream`, `current_stream`, `Event`, `stream(...)`
     -> inert stand-ins. p2p communication and the dist-ckpt writer synchronize; DDP's
     `start_grad_sync` (0.19.x) waits on the current stream. On CPU every op is synchronous already.
  P4 the "CUDA" RNG (tensor_parallel.random: `model_parallel_cuda_manual_seed`, the RNG tracker used
     by TP init and dropout) -> the CPU default generator, so the tracker keeps its fork semantics.
  P5 `torch.distributed.scatter`: gloo silently sends WRONG data when the scatter list holds
     non-contiguous views (2-rank repro on torch 2.13); the distributed optimizer's dp-zero state
     (de)serialisation does exactly that. The proxy makes the list contiguous.
  P6 string type checks: grad clipping, the mixed-precision and distributed optimizers assert
     `param.type() == 'torch.cuda.FloatTensor'` (and Half/BFloat16). While those functions run,
     `Tensor.type()` without arguments reports CPU tensors under their CUDA names.
  P7 `tensor.cuda()`: the distributed optimizer's DP-rank-0 gather of its state (used by the
     layout-independent `fully_reshardable` checkpoint format) moves buffers with `.cuda()`. While
     that function runs, `.cuda()` of a CPU tensor returns the tensor itself.
  P8 torch Adam's per-parameter `step`: without transformer-engine / apex megatron falls back to
     torch Adam, which keeps `step` in each parameter's state. Loading the `fully_reshardable`
     optimizer format copies every state key from the checkpoint, but the checkpoint delivers `step`
     through the param groups instead (restored by load_state_dict just before): KeyError 'step'.
     The loader is given the already-restored `step` back, so it copies it onto itself. This one is not
     about the CPU: a GPU without transformer-engine and apex falls back to torch Adam too, so P8 is
     installed on GPU as well whenever megatron's optimizer module resolved `Adam` to torch's.
  P9 `tensor.cuda()` in `LanguageModule.setup_embeddings_and_output_layer` (0.16.1 and 0.19.2: `weight.data
     = weight.data.cuda()` right before the all-reduce over the embedding group). With tied embeddings
     at PP > 1 every GPTModel construction (training, the reference model, conversion) reaches it and
     fails ("Torch not compiled with CUDA enabled"). While that function runs, `.cuda()` of a CPU tensor
     returns the tensor itself, so the zero-filled last-stage copy is still all-reduced with the first
     stage's embedding on gloo: both copies start equal (finalize_model_grads later sums their grads
     over the same group; that needs no patch).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
import types
import warnings

import torch

TESTED_VERSIONS = ("0.16.1", "0.19.2")
_FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "zeros_like",
    "ones_like", "empty_like", "full_like", "as_tensor", "eye", "linspace",
})
_applied = False


def _cpu_if_cuda(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _device_rewriting(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return fn(*args, **kwargs)
    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU, where every op is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):       # wait_stream, wait_event, record, synchronize, record_stream...
        return lambda *args, **kwargs: None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _CudaOnCpu:
    """The `torch.cuda` megatron-core sees (P1, P3, P4); everything else is the real torch.cuda."""

    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda *a, **k: None)
    empty_cache = staticmethod(lambda *a, **k: None)
    Stream = _NullStream
    Event = _NullStream
    current_stream = staticmethod(lambda *a, **k: _NullStream())
    default_stream = staticmethod(lambda *a, **k: _NullStream())
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _scatter_contiguous(tensor, scatter_list=None, *args, **kwargs):
    if scatter_list is not None:
        scatter_list = [t.contiguous() for t in scatter_list]
    return torch.distributed.scatter(tensor, scatter_list, *args, **kwargs)


class _DistributedOnCpu:
    """The `torch.distributed` megatron-core sees (P5)."""

    scatter = staticmethod(_scatter_contiguous)

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


class _TorchOnCpu:
    """The module-global `torch` of megatron-core modules (P1-P5). Lookups are cached on the instance."""

    cuda = _CudaOnCpu()
    distributed = _DistributedOnCpu()

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            value = _device_rewriting(value)
        elif name == "autocast":
            value = functools.partial(_autocast_on_cpu)
        self.__dict__[name] = value
        return value


def _autocast_on_cpu(device_type, *args, **kwargs):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


_TORCH_PROXY = _TorchOnCpu()


def _patch_module(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_PROXY
    if module.__name__ == "megatron.core.tensor_parallel.random":       # P4
        module._get_cuda_rng_state = _cpu_rng_get
        module._set_cuda_rng_state = _cpu_rng_set


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _patch_module(module)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Patches megatron-core modules imported after apply() (several are imported lazily)."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _tensor_cuda_is_self():
    """P7 / P9: inside, `t.cuda()` is `t`. A Tensor method, so the module proxy cannot reach it: only
    the megatron functions wrapped with _scoped run inside."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def _cuda_type_names():
    """P6 + P7: inside, `t.type()` of a CPU float tensor answers with the CUDA type name and
    `t.cuda()` is `t`. Only megatron functions listed in _patch_type_checks run inside."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        with _tensor_cuda_is_self():
            yield
    finally:
        torch.Tensor.type = original


def _scoped(fn, context):
    """`fn` running inside `context()`, marked so that apply() wraps it only once."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    wrapper.__megatron_rl_patched__ = True
    return wrapper


def _patch_scoped(targets, context) -> None:
    for owner, name in targets:
        fn = getattr(owner, name)
        if not getattr(fn, "__megatron_rl_patched__", False):
            setattr(owner, name, _scoped(fn, context))


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    targets = [(clip_grads, "clip_grad_by_total_norm_fp32"), (optimizer, "clip_grad_by_total_norm_fp32"),
               (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
               (distrib_optimizer.DistributedOptimizer, "__init__"),
               (distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero")]
    _patch_scoped(targets, _cuda_type_names)


def _patch_tied_embedding_setup() -> None:
    """P9. Patched on LanguageModule itself: GPTModel (and every other language model) inherits the
    method and calls it from __init__ through `self`, so each construction runs the wrapper."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _patch_scoped([(LanguageModule, "setup_embeddings_and_output_layer")], _tensor_cuda_is_self)


def _keep_adam_step(fn):
    @functools.wraps(fn)
    def wrapper(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return fn(self, model_param, tensors)
    wrapper.__megatron_rl_patched__ = True
    return wrapper


def _patch_adam_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fn = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(fn, "__megatron_rl_patched__", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _keep_adam_step(fn)


def _patch_adam_step_if_torch_adam() -> None:
    import megatron.core.optimizer as optimizer

    if getattr(optimizer, "Adam", None) is not None and optimizer.Adam.__module__.startswith("torch."):
        _patch_adam_step()


def apply() -> bool:
    """Install the patches when CUDA is absent; idempotent. Returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        _patch_adam_step_if_torch_adam()   # P8 is about torch Adam, not the CPU
        return False
    if _applied:
        return True
    import megatron.core
    version = getattr(megatron.core, "__version__", "?")
    if version not in TESTED_VERSIONS:
        warnings.warn(f"megatron_rl.patches.megatron_cpu was tested with megatron-core "
                      f"{', '.join(TESTED_VERSIONS)}; found {version}", stacklevel=2)
    sys.meta_path.insert(0, _MegatronImportHook())
    # Import what the training path uses so the proxies are in place before anything runs.
    for name in ("megatron.core.tensor_parallel", "megatron.core.pipeline_parallel.schedules",
                 "megatron.core.pipeline_parallel.p2p_communication", "megatron.core.optimizer",
                 "megatron.core.distributed", "megatron.core.models.gpt",
                 "megatron.core.dist_checkpointing"):
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _patch_module(module)
    _patch_type_checks()
    _patch_adam_step()
    _patch_tied_embedding_setup()
    _applied = True
    return True


def active() -> bool:
    return _applied
