"""A thin rollout engine over `vllm.LLM`: sample n responses per prompt with mu's log-probs.

Every setting below exists because of a measured trap (platform.md, vLLM section):
- `dtype` is explicit: "auto" silently becomes bfloat16 on CPU.
- `logprobs_mode="processed_logprobs"`: the only mode equal to log_softmax(logits / T); the trainer
  scales its logits by the same T. Top-p / top-k truncation is refused: the trainer does not apply it,
  so the ratio pi / mu would be biased (algorithms.md section 1). The model's generation_config is
  ignored for the same reason (real models ship top_k / top_p defaults there).
- Per-request seeds (derived from seed, step, prompt index, sample index) make a rollout reproducible
  whatever the batch order or engine restart; with seeds, chunked prefill kills the engine once a step
  prefills > max_num_batched_tokens, so chunked prefill is off and the token budget covers a full prompt.
- `max_logprobs` >= K; `flat_logprobs=True` (fewer Python objects at K = 20) gives, per position, the
  sampled token followed by exactly K top entries in rank order, hence fixed-shape [T, K] rows.
- Multiprocess mode by default: the in-process engine clashes with a trainer's torch.distributed group.
- sleep / wake_up do nothing on CPU and `enable_sleep_mode` is rejected there: GPU only, guarded.
- Tensor parallelism on CPU: vLLM's automatic thread binding needs a NUMA node per worker and refuses
  to start otherwise, so on smaller machines the cores are split explicitly (cpu_thread_binding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from megatron_rl.rollout.types import Rollout, Sample
from megatron_rl.rollout.weight_sync import DEFAULT_BUCKET_BYTES, sync_weights, verify_weights

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
PROBE_STEP = -1          # the probe's request seeds: fixed, and never a training step's
WORKER_EXTENSION = "megatron_rl.rollout.worker_ext.WeightSyncExtension"
# vLLM arguments this class sets itself; extra_engine_args may not override them
_OWNED_ARGS = {"model", "dtype", "logprobs_mode", "max_logprobs", "seed", "enforce_eager", "max_model_len",
               "tensor_parallel_size", "enable_chunked_prefill", "max_num_batched_tokens",
               "worker_extension_cls", "enable_sleep_mode", "generation_config", "enable_prefix_caching",
               "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_seqs", "tokenizer"}


@dataclass(frozen=True)
class EngineConfig:
    model: str                              # HF model directory (config, safetensors, tokenizer)
    dtype: str = "bfloat16"                 # float32 | bfloat16 | float16; never "auto"
    temperature: float = 1.0                # must equal the trainer's
    top_p: float = 1.0                      # anything else is refused (see module docstring)
    top_k: int = -1                         # -1 or 0: off; anything else is refused
    n_samples: int = 1                      # responses per prompt (the GRPO group size)
    max_response_tokens: int = 512
    max_model_len: int = 2048               # prompt + response
    logprobs_topk: int = 0                  # K of mu's top-K per token; 0: only the sampled token's
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()    # besides the tokenizer's EOS
    enforce_eager: bool = True              # no CUDA graphs / compile: faster start, same numbers
    multiprocess: bool = True               # engine core in its own process (coexists with gloo groups)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_bytes: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None   # default: max(max_model_len, 8192)
    max_num_seqs: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False         # GPU only; ignored with a log on CPU
    extra_engine_args: dict[str, Any] = field(default_factory=dict)   # passed to vllm.LLM verbatim

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"rollout engine config: `{key}` {why}")

        if not self.model:
            bad("model", "must name an HF model directory")
        if self.dtype not in DTYPES:
            bad("dtype", f"is {self.dtype!r}; allowed: {', '.join(DTYPES)} (\"auto\" silently picks bfloat16 on CPU)")
        if not self.temperature > 0:
            bad("temperature", f"must be > 0, got {self.temperature}: the trainer divides its logits by it")
        if self.top_p != 1.0:
            bad("top_p", f"is {self.top_p}: top-p truncation changes mu and the trainer does not apply it "
                "(the importance ratio would be biased); use top_p=1.0")
        if self.top_k not in (0, -1):
            bad("top_k", f"is {self.top_k}: top-k truncation changes mu and the trainer does not apply it "
                "(the importance ratio would be biased); use top_k=-1")
        for key in ("n_samples", "max_response_tokens", "max_model_len", "tensor_parallel_size"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_response_tokens >= self.max_model_len:
            bad("max_response_tokens", f"({self.max_response_tokens}) must be < max_model_len ({self.max_model_len})")
        if self.logprobs_topk < 0:
            bad("logprobs_topk", f"must be >= 0, got {self.logprobs_topk}")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_model_len:
            bad("max_num_batched_tokens", f"({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}): chunked prefill is off (it kills a seeded engine)")
        clash = sorted(set(self.extra_engine_args) & _OWNED_ARGS)
        if clash:
            bad("extra_engine_args", f"may not set {clash}; use the config fields of the same purpose")

    def vllm_kwargs(self, cuda: bool) -> dict[str, Any]:
        kw = dict(
            model=self.model, dtype=self.dtype, seed=self.seed, enforce_eager=self.enforce_eager,
            logprobs_mode="processed_logprobs",
            max_logprobs=max(self.logprobs_topk, 20),   # 20 is vLLM's default; asking more raises
            max_model_len=self.max_model_len, tensor_parallel_size=self.tensor_parallel_size,
            enable_chunked_prefill=False,
            max_num_batched_tokens=self.max_num_batched_tokens or max(self.max_model_len, 8192),
            worker_extension_cls=WORKER_EXTENSION, generation_config="vllm",
            enable_prefix_caching=self.enable_prefix_caching,
        )
        # On CPU vLLM reads this as the share of HOST memory it may reserve, and refuses to start when
        # less than that is free: always pass it (vLLM's own default, 0.92, fails beside a learner).
        kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        if cuda:
            kw["enable_sleep_mode"] = self.enable_sleep_mode
        if self.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        kw.update(self.extra_engine_args)
        return kw


def request_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A stable 63-bit seed per (run seed, step, prompt, sample): same inputs, same tokens."""
    digest = hashlib.blake2b(f"{seed}:{step}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generation_config_eos(model_dir: str) -> set[int]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cpu_thread_binding(tp: int, numa_nodes: int, cpus: Sequence[int]) -> Optional[str]:
    """VLLM_CPU_OMP_THREADS_BIND for a CPU engine of `tp` workers, or None to keep vLLM's "auto".

    "auto" pins each TP worker to a NUMA node of its own and refuses to start with fewer nodes than
    workers ("Not enough allowed NUMA nodes", then "Engine core initialization failed"), i.e. on any
    one-socket machine. There the usable cores are split into `tp` groups, one per worker ("0|1" for
    two cores); like "auto", a core per worker is left to the engine core's scheduler when there are
    at least two per worker.
    """
    if tp == 1 or numa_nodes >= tp:
        return None
    cpus = sorted(cpus)
    if len(cpus) < tp:
        raise ValueError(f"rollout engine config: `tensor_parallel_size` {tp} on CPU needs at least {tp} usable "
                         f"cores (this process may use {len(cpus)}): lower it, or set VLLM_CPU_OMP_THREADS_BIND "
                         "yourself (vLLM's 'nobind' shares all cores between the workers)")
    if len(cpus) >= 2 * tp:
        cpus = cpus[: len(cpus) - tp]
    per = len(cpus) // tp
    return "|".join(",".join(str(c) for c in cpus[i * per: (i + 1) * per]) for i in range(tp))


def parse_logprobs(per_position, response_ids: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's log-probs of one response -> (rollout_logprobs [T], topk_ids [T, K], topk_logprobs [T, K]).

    The flat layout (`flat_logprobs=True`, what the engine asks for) stores per position the sampled
    token first, then exactly K top entries in rank order (the sampled token appears twice when it is
    in the top K), so no dedup is needed. The dict layout (one {id: Logprob} per position, K entries
    when the sampled token is in the top K, K + 1 otherwise) is accepted too.
    """
    t = len(response_ids)
    if not hasattr(per_position, "start_indices"):
        return _parse_dict_logprobs(per_position, response_ids, k)
    ids = torch.tensor(per_position.token_ids, dtype=torch.int64)
    lps = torch.tensor(per_position.logprobs, dtype=torch.float32)
    if len(per_position.start_indices) != t or ids.numel() != t * (k + 1):
        raise RuntimeError(f"vLLM returned {len(per_position.start_indices)} positions / {ids.numel()} log-prob "
                           f"entries for {t} tokens at K={k}; expected {t} / {t * (k + 1)}")
    ids, lps = ids.view(t, k + 1), lps.view(t, k + 1)
    if t and not torch.equal(ids[:, 0], torch.tensor(list(response_ids), dtype=torch.int64)):
        raise RuntimeError("vLLM's first log-prob entry per position is not the sampled token")
    return lps[:, 0].contiguous(), ids[:, 1:].contiguous(), lps[:, 1:].contiguous()


def _parse_dict_logprobs(per_position, response_ids: Sequence[int], k: int):
    t = len(response_ids)
    if per_position is None or len(per_position) != t:
        raise RuntimeError(f"vLLM returned {0 if per_position is None else len(per_position)} log-prob positions "
                           f"for {t} tokens")
    sampled = torch.empty(t, dtype=torch.float32)
    top_ids = torch.empty(t, k, dtype=torch.int64)
    top_lps = torch.empty(t, k, dtype=torch.float32)
    for i, (tok, d) in enumerate(zip(response_ids, per_position)):
        if tok not in d:
            raise RuntimeError(f"position {i}: the sampled token {tok} is missing from vLLM's log-probs")
        sampled[i] = d[tok].logprob
        # top-K entries carry ranks 1..K; the sampled token's own rank can tie into that range when it
        # is NOT one of them (K + 1 entries), so it is the one to drop then
        ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in d.items()), key=lambda e: (e[0], -e[2]))
        ranked = [e for e in ranked if e[0] <= k]
        if len(ranked) > k:
            ranked = [e for e in ranked if e[1] != tok]
        if len(ranked) != k:
            raise RuntimeError(f"position {i}: {len(ranked)} top entries in vLLM's log-probs, expected {k}")
        top_ids[i] = torch.tensor([e[1] for e in ranked])
        top_lps[i] = torch.tensor([e[2] for e in ranked])
    return sampled, top_ids, top_lps


class RolloutEngine:
    """Owns one `vllm.LLM`. Only the rank that builds it may call it."""

    def __init__(self, config: EngineConfig):
        from vllm import LLM   # vllm is imported lazily, here and in worker_ext (inside vLLM's workers)

        self.config = config
        self.cuda = torch.cuda.is_available()
        if config.enable_sleep_mode and not self.cuda:
            log.info("rollout engine: enable_sleep_mode ignored (vLLM sleep mode is GPU-only)")
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if config.multiprocess else "0"}
        if not self.cuda and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            from vllm.utils.cpu_resource_utils import get_visible_memory_node   # what vLLM's check counts

            bind = cpu_thread_binding(config.tensor_parallel_size, len(get_visible_memory_node()),
                                      os.sched_getaffinity(0))
            if bind is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = bind
                log.info("rollout engine: CPU workers bound to cores %s (VLLM_CPU_OMP_THREADS_BIND)", bind)
        t0 = time.perf_counter()
        with _env(env):
            self.llm = LLM(**config.vllm_kwargs(self.cuda))
        self.start_seconds = time.perf_counter() - t0
        mode = type(self.llm.llm_engine.engine_core).__name__
        if config.multiprocess == (mode == "InprocClient"):
            # vLLM caches its environment after an in-process engine starts in this process
            self.shutdown()
            raise RuntimeError(f"rollout engine: asked for multiprocess={config.multiprocess} but vLLM built "
                               f"{mode}; an in-process engine started earlier in this process froze "
                               "VLLM_ENABLE_V1_MULTIPROCESSING: use one mode per process")
        self.tokenizer = self.llm.get_tokenizer()
        # generation_config is ignored (its top_k / top_p), but its EOS ids matter: instruct models list
        # several there (e.g. Qwen's <|im_end|> and <|endoftext|>), while the tokenizer names one
        self._stop_ids = set(config.stop_token_ids) | _generation_config_eos(config.model)
        if self.tokenizer.eos_token_id is not None:
            self._stop_ids.add(int(self.tokenizer.eos_token_id))
        self._sleeping = False
        log.info("rollout engine started in %.1f s (%s, dtype %s)", self.start_seconds, mode, config.dtype)

    # ---- generation -------------------------------------------------------------------------------
    def sampling_params(self, prompt_len: int, seed: int, max_tokens: Optional[int] = None):
        from vllm import SamplingParams

        cfg = self.config
        room = cfg.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room under max_model_len={cfg.max_model_len}")
        cap = cfg.max_response_tokens if max_tokens is None else min(int(max_tokens), cfg.max_response_tokens)
        sp = SamplingParams(n=1, temperature=cfg.temperature, top_p=1.0, top_k=0, min_p=0.0,
                            max_tokens=min(cap, room), logprobs=cfg.logprobs_topk,
                            flat_logprobs=True, detokenize=False, seed=seed,
                            stop_token_ids=sorted(self._stop_ids) or None)
        return sp

    def generate(self, prompts: Sequence[Sequence[int]], *, prompt_indices: Optional[Sequence[int]] = None,
                 step: int = 0, n: Optional[int] = None, infos: Optional[Sequence[dict]] = None,
                 max_tokens: Optional[int] = None) -> Rollout:
        """n responses for each prompt (token ids). Group g = the g-th prompt of this call.

        `prompt_indices` are the data set's stable ids (default 0..len-1): with `step` and the config
        seed they fix every request's seed, so the same call gives the same rollout after a restart.
        `infos[g]` (e.g. {"answer": ...}) is copied into each sample of group g. `max_tokens` lowers the
        response cap of this call (never above the config's).
        """
        if self._sleeping:
            raise RuntimeError("rollout engine is asleep: call wake_up() before generate()")
        cfg = self.config
        n = cfg.n_samples if n is None else int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(prompt_indices) != len(prompts) or (infos is not None and len(infos) != len(prompts)):
            raise ValueError("prompt_indices and infos must have one entry per prompt")
        requests, params, keys = [], [], []
        for g, (ids, pidx) in enumerate(zip(prompts, prompt_indices)):
            ids = [int(i) for i in ids]
            if not ids:
                raise ValueError(f"prompt {g} (index {pidx}) is empty")
            for j in range(n):
                requests.append({"prompt_token_ids": ids})
                params.append(self.sampling_params(len(ids), request_seed(cfg.seed, step, pidx, j), max_tokens))
                keys.append((g, pidx, j))
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        gen_seconds = time.perf_counter() - t0

        samples, n_tokens, n_empty, n_truncated = [], 0, 0, 0
        for (g, pidx, j), out in zip(keys, outputs):
            comp = out.outputs[0]
            resp = list(comp.token_ids)
            lp, tk_ids, tk_lps = parse_logprobs(comp.logprobs, resp, cfg.logprobs_topk)
            if not [t for t in resp if t not in self._stop_ids]:
                n_empty += 1   # nothing but a stop token (or nothing): kept, scored like any response
            n_truncated += comp.finish_reason == "length"
            n_tokens += len(resp)
            samples.append(Sample(
                prompt_ids=torch.tensor(out.prompt_token_ids, dtype=torch.int64),
                response_ids=torch.tensor(resp, dtype=torch.int64), rollout_logprobs=lp,
                finish_reason=str(comp.finish_reason), prompt_index=pidx, group_id=g, sample_index=j,
                topk_ids=tk_ids if cfg.logprobs_topk else None,
                topk_logprobs=tk_lps if cfg.logprobs_topk else None,
                response_text=self.tokenizer.decode(resp, skip_special_tokens=True),
                info=dict(infos[g]) if infos is not None else {}))
        stats = {"rollout/samples": len(samples), "rollout/response_tokens": n_tokens,
                 "rollout/empty_responses": n_empty, "rollout/truncated": n_truncated,
                 "rollout/response_length_mean": n_tokens / max(len(samples), 1),
                 "rollout/generate_seconds": gen_seconds,
                 "rollout/tokens_per_second": n_tokens / gen_seconds if gen_seconds > 0 else 0.0}
        return Rollout(samples, topk=cfg.logprobs_topk, temperature=cfg.temperature, stats=stats)

    def probe(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[Rollout]:
        """The weight-sync probe (mismatch.compare_probe): one seeded response per prompt with mu's
        log-probs, as one list entry per engine replica (here: this engine)."""
        return [self.generate(prompts, step=PROBE_STEP, n=1, max_tokens=max_tokens)]

    # ---- engine control ---------------------------------------------------------------------------
    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """Call a WeightSyncExtension method on every worker (results by worker rank)."""
        return self.llm.collective_rpc(method, args=args)

    def update_weights(self, named_tensors, max_bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        """Stream (hf_name, tensor) pairs into the engine in bounded buckets (weight_sync.sync_weights)."""
        return sync_weights(self, named_tensors, max_bucket_bytes=max_bucket_bytes)

    def verify_weights(self, named_tensors, atol: float = 0.0):
        """Compare the engine's weights with (hf_name, tensor) pairs (weight_sync.verify_weights)."""
        return verify_weights(self, named_tensors, atol=atol)

    def reset_prefix_cache(self) -> None:
        # KV blocks cached under old weights would otherwise be reused after a weight sync
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("rollout engine: vLLM refused to reset the prefix cache (requests running?)")

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory (level 1: offload weights, drop KV cache). No-op with a log on CPU."""
        if not (self.cuda and self.config.enable_sleep_mode):
            log.info("rollout engine: sleep() is a no-op (needs CUDA and enable_sleep_mode=True)")
            return
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        if not self._sleeping:
            log.info("rollout engine: wake_up() is a no-op (not asleep)")
            return
        self.llm.wake_up()
        self._sleeping = False

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        self.llm = None

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
