"""Disaggregated rollout: vLLM engines in their own processes (nodes, TP), the learner elsewhere.

`RemoteEngines` is the learner-side client (on the learner's global rank 0). It has the methods the
loop calls on a local RolloutEngine (generate / update_weights / verify_weights / shutdown) plus the
overlap API of one-step off-policy training:

    handle = engines.submit(prompts, prompt_indices=..., step=k + 1)   # starts generating now
    ... train on step k's rollout ...
    engines.update_weights(hf_weights(learner))   # waits for `handle` to finish first (see below)
    rollout = handle.result()                      # generated with the weights of before the update

Weight versions. The client counts updates (`version`: 0 = the weights the engines started from;
each update_weights sets version + 1 unless told a version, e.g. the policy step on resume). Every
rollout records the version it was generated with in `rollout.stats["rollout/weight_version"]` (also
`rollout.weight_version` and `handle.weight_version`), so the loop logs lag = policy step - version.

Updates never land mid-generation: each engine server runs one request at a time, and update_weights
first waits for every in-flight generation to complete (their rollouts are kept in their handles).
So a generation submitted before an update returns the old version, the next one the new version.
A consequence worth knowing: with lag 1, the update of step k waits for step k+1's generation, so a
step costs max(generate, train) + sync rather than generate + train + sync.

Prompts are split across the R engines in contiguous, near-equal chunks; results are merged in prompt
order with group ids offset to the global prompt position, so the merged Rollout equals what ONE
engine gives for the same call (the per-request seeds depend on step, prompt index and sample index,
never on which engine or batch). Wire protocol and process group: remote_comm.py; server:
remote_server.py; settings are written by the client into the shared store at construction.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_rl.rollout.engine import PROBE_STEP
from megatron_rl.rollout.remote_comm import (SECRET_ENV, AuthError, EngineError, Link, WeightGroup, client_handshake,
                                             host_store, load_secret, new_secret, parse_address, resolve_backend, sign)
from megatron_rl.rollout.remote_server import SETTINGS_KEY, SETTINGS_MAC_KEY, child_env, engine_addr_key
from megatron_rl.rollout.types import Rollout
from megatron_rl.rollout.weight_sync import DEFAULT_BUCKET_BYTES, SyncStats, WeightCheck, plan_buckets

log = logging.getLogger(__name__)

ENV_RENDEZVOUS, ENV_NUM_ENGINES = "MRL_ENGINE_RENDEZVOUS", "MRL_NUM_ENGINES"   # exported by launch.sh
_SUM_STATS = ("rollout/samples", "rollout/response_tokens", "rollout/empty_responses", "rollout/truncated")

__all__ = ["RemoteConfig", "RemoteEngines", "RolloutHandle", "RemoteWeightCheck", "EngineError",
           "start_local_engines", "kill_local_engines", "weight_version"]


@dataclass(frozen=True)
class RemoteConfig:
    rendezvous: str                       # HOST:PORT the client's store listens on (port 0: any free port)
    num_engines: int
    backend: str = "auto"                 # weight group: auto (nccl with CUDA, else gloo) | gloo | nccl
    startup_timeout_s: float = 1800.0     # engines registering (an engine start is minutes at scale)
    request_timeout_s: float = 7200.0     # one generation, or one weight stream's acknowledgement
    collective_timeout_s: float = 600.0   # one broadcast of the weight group
    heartbeat_interval_s: float = 5.0     # engines report liveness this often while busy
    heartbeat_timeout_s: float = 120.0    # silence after which an engine counts as dead
    initial_version: int = 0              # the version of the weights the engines start from
    # the job's control-channel secret; None: $MEGATRON_RL_SECRET (never printed: repr=False)
    secret: Optional[str] = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"remote rollout config: `{key}` {why}")

        host, _ = parse_address(self.rendezvous, "remote rollout config: `rendezvous`")
        if self.num_engines < 1:
            bad("num_engines", f"must be >= 1, got {self.num_engines}")
        if self.backend not in ("auto", "gloo", "nccl"):
            bad("backend", f"is {self.backend!r}; allowed: auto, gloo, nccl")
        for key in ("startup_timeout_s", "request_timeout_s", "collective_timeout_s", "heartbeat_interval_s",
                    "heartbeat_timeout_s"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            bad("heartbeat_timeout_s", f"({self.heartbeat_timeout_s}) must exceed twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or a busy engine looks dead")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "RemoteConfig":
        """Rendezvous and engine count from the variables launch.sh exports to the train step."""
        environ = os.environ if environ is None else environ
        for var in (ENV_RENDEZVOUS, ENV_NUM_ENGINES):
            if not environ.get(var):
                raise ValueError(f"disaggregated rollout: environment variable {var} is not set (launch.sh "
                                 "exports it to the train step when rollout.placement is disaggregated)")
        # checked here, at the trainer's start-up validation, not when the engines are already up
        secret = overrides.pop("secret", None) or load_secret(environ=environ).decode()
        return cls(rendezvous=environ[ENV_RENDEZVOUS], num_engines=int(environ[ENV_NUM_ENGINES]), secret=secret,
                   **overrides)


def weight_version(rollout: Rollout) -> int:
    """The weight version a rollout was generated with (kept in its stats, which select() carries)."""
    return int(rollout.stats["rollout/weight_version"])


@dataclass
class RemoteWeightCheck(WeightCheck):
    """Every engine's check merged (worst diff per name); `per_engine[i]` is engine i's own."""
    per_engine: list = dataclasses.field(default_factory=list)

    def summary(self, limit: int = 8) -> str:
        bad = [f"engine {i}: {c.summary(limit)}" for i, c in enumerate(self.per_engine) if not c.ok]
        return "; ".join([super().summary(limit)] + bad)


class RolloutHandle:
    """One submitted generation; `result()` waits for every engine's part and merges them."""

    def __init__(self, client: "RemoteEngines", req_id: int, parts: list[tuple[int, int]], num_prompts: int,
                 weight_version: int):
        self._client, self._id, self._parts = client, req_id, parts    # parts: (engine, prompt offset)
        self.num_prompts, self.weight_version = num_prompts, weight_version
        self._t0 = time.perf_counter()
        self._rollout: Optional[Rollout] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        return self._rollout is not None or self._error is not None

    def result(self) -> Rollout:
        """The merged rollout (waits up to request_timeout_s; a timeout is fatal to the client)."""
        if not self.done():
            self._collect()
        if self._error is not None:
            raise self._error
        return self._rollout

    def _collect(self) -> None:
        c = self._client
        timeout_s = c.config.request_timeout_s
        try:
            replies = [(c._links[e].wait(self._id, timeout_s, f"generate request {self._id}"), off)
                       for e, off in self._parts]
            self._rollout = self._merge(replies, time.perf_counter() - self._t0)
        except BaseException as e:
            self._error = e
            if getattr(e, "fatal", True):
                c._broken = c._broken or str(e)
        finally:
            if self in c._inflight:
                c._inflight.remove(self)

    def _merge(self, replies, seconds: float) -> Rollout:
        versions = {r["version"] for r, _ in replies}
        if versions != {self.weight_version}:
            raise RuntimeError(f"remote rollout: engines generated with weight versions {sorted(versions)}, "
                               f"the client expected {self.weight_version} (an update raced a generation)")
        samples, parts = [], [r["rollout"] for r, _ in replies]
        for (_, offset), part in zip(replies, parts):
            for s in part.samples:
                s.group_id += offset      # local group g of this engine = prompt offset + g of the call
                samples.append(s)
        first = parts[0] if parts else None
        stats = {k: float(sum(p.stats.get(k, 0) for p in parts)) for k in _SUM_STATS}
        stats["rollout/response_length_mean"] = stats["rollout/response_tokens"] / max(stats["rollout/samples"], 1)
        stats["rollout/generate_seconds"] = max((p.stats.get("rollout/generate_seconds", 0.0) for p in parts),
                                                default=0.0)
        stats["rollout/remote_seconds"] = seconds     # submit -> all parts back, transfers included
        stats["rollout/tokens_per_second"] = stats["rollout/response_tokens"] / max(seconds, 1e-9)
        stats["rollout/engines"] = float(len(parts))
        stats["rollout/weight_version"] = float(self.weight_version)
        rollout = Rollout(samples, topk=first.topk if first else self._client.topk,
                          temperature=first.temperature if first else 1.0, stats=stats)
        rollout.weight_version = self.weight_version
        return rollout


class RemoteEngines:
    """Client of R engine servers. Construct on the learner's rank 0, then `connect()` (multi-node:
    `RemoteEngines(RemoteConfig.from_env(), engine_config).connect()` waits for the servers launch.sh
    started), or use `start_local_engines`. Not thread-safe: call it from one thread."""

    def __init__(self, config: RemoteConfig, engine_config, processes: Sequence[subprocess.Popen] = ()):
        """Host the store at config.rendezvous and publish the settings; fast, engines not needed yet."""
        self.config, self.engine_config = config, engine_config
        self.backend = resolve_backend(config.backend)
        self.topk = engine_config.logprobs_topk
        self.version = config.initial_version
        self.processes = list(processes)
        self._links: list[Link] = []
        self._group: Optional[WeightGroup] = None
        self._inflight: list[RolloutHandle] = []
        self._ids = itertools.count()
        self._broken: Optional[str] = None
        self._secret = load_secret(config.secret)
        host, port = parse_address(config.rendezvous, "rendezvous")
        self.host = host
        self._store = host_store(host, port, config.startup_timeout_s)   # the rendezvous interface only
        self.rendezvous = f"{host}:{self._store.port}"
        settings = {"num_engines": config.num_engines, "backend": self.backend,
                    "collective_timeout_s": config.collective_timeout_s,
                    "heartbeat_interval_s": config.heartbeat_interval_s, "initial_version": config.initial_version,
                    "engine_config": dataclasses.asdict(engine_config)}
        raw = json.dumps(settings).encode()
        self._store.set(SETTINGS_MAC_KEY, sign(self._secret, raw))   # first: a server reads the MAC after the settings
        self._store.set(SETTINGS_KEY, raw)

    def connect(self) -> "RemoteEngines":
        """Wait for every engine to register, join the weight group, open the control connections."""
        cfg, r = self.config, self.config.num_engines
        deadline = time.monotonic() + cfg.startup_timeout_s
        addrs: dict[int, str] = {}
        while len(addrs) < r:
            for i in range(r):
                if i not in addrs and self._store.check([engine_addr_key(i)]):
                    addrs[i] = self._store.get(engine_addr_key(i)).decode()
            dead = [(i, p.poll()) for i, p in enumerate(self.processes) if i not in addrs and p.poll() is not None]
            if dead:
                i, code = dead[0]
                raise EngineError(i, f"rollout engine {i} of {r} exited with code {code} before registering")
            if len(addrs) < r:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(r)) - set(addrs))
                    raise EngineError(missing[0], f"rollout engines {missing} of {r} did not register at "
                                      f"{self.rendezvous} within startup_timeout_s={cfg.startup_timeout_s:g}")
                time.sleep(0.2)
        self._group = WeightGroup(self._store, 0, r + 1, self.backend, cfg.collective_timeout_s, self.host)
        for i in range(r):
            sock = socket.create_connection(parse_address(addrs[i], f"engine {i} address"),
                                            timeout=cfg.startup_timeout_s)
            try:   # mutual: the engine proves it holds the secret too, so its replies may be unpickled
                channel = client_handshake(sock, self._secret)
            except AuthError as e:
                sock.close()
                raise EngineError(i, f"rollout engine {i} of {r} ({addrs[i]}): authentication failed: {e}") from e
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            proc = self.processes[i] if i < len(self.processes) else None
            self._links.append(Link(i, r, addrs[i], channel, cfg.heartbeat_timeout_s,
                                    proc.poll if proc is not None else None))
        for link in self._links:
            hello = link.wait("hello", cfg.startup_timeout_s, "start-up")
            if hello["version"] != self.version:
                raise EngineError(link.engine_rank, f"{link.label} starts at weight version {hello['version']}, "
                                  f"the client at {self.version}")
        log.info("connected to %d rollout engines via %s (%s weight group)", r, self.rendezvous, self.backend)
        return self

    # ---- generation ----------------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], *, prompt_indices: Optional[Sequence[int]] = None,
               step: int = 0, n: Optional[int] = None, infos: Optional[Sequence[dict]] = None) -> RolloutHandle:
        """Start generating and return at once. Arguments as RolloutEngine.generate."""
        self._usable("submit")
        prompts = [[int(t) for t in p] for p in prompts]
        prompt_indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(prompt_indices) != len(prompts) or (infos is not None and len(infos) != len(prompts)):
            raise ValueError("prompt_indices and infos must have one entry per prompt")
        req_id, r = next(self._ids), len(self._links)
        bounds = [len(prompts) * e // r for e in range(r + 1)]   # contiguous, sizes differ by at most 1
        parts = []
        for e in range(r):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi and parts:
                continue       # fewer prompts than engines: idle engines get nothing (one empty call at most)
            self._send(e, {"type": "generate", "id": req_id, "prompts": prompts[lo:hi],
                           "prompt_indices": prompt_indices[lo:hi], "step": step, "n": n,
                           "infos": None if infos is None else list(infos[lo:hi])}, f"generate request {req_id}")
            parts.append((e, lo))
        handle = RolloutHandle(self, req_id, parts, len(prompts), self.version)
        self._inflight.append(handle)
        return handle

    def probe(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[Rollout]:
        """The weight-sync probe on EVERY engine (each must score like the learner): the same prompts,
        one seeded response each, one rollout per engine in engine order."""
        self._usable("probe")
        prompts = [[int(t) for t in p] for p in prompts]
        handles = []
        for e in range(len(self._links)):
            req_id = next(self._ids)
            self._send(e, {"type": "generate", "id": req_id, "prompts": prompts,
                           "prompt_indices": list(range(len(prompts))), "step": PROBE_STEP, "n": 1,
                           "infos": None, "max_tokens": int(max_tokens)}, f"probe request {req_id}")
            handles.append(RolloutHandle(self, req_id, [(e, 0)], len(prompts), self.version))
            self._inflight.append(handles[-1])
        return [h.result() for h in handles]

    def _send(self, engine: int, msg: dict, what: str) -> None:
        try:
            self._links[engine].send(msg, what)
        except EngineError as e:   # requests already sent to the others would be answered out of turn
            self._broken = self._broken or str(e)
            raise

    def generate(self, prompts, *, prompt_indices=None, step: int = 0, n=None, infos=None) -> Rollout:
        return self.submit(prompts, prompt_indices=prompt_indices, step=step, n=n, infos=infos).result()

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights(self, named_tensors, max_bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                       version: Optional[int] = None) -> SyncStats:
        """Broadcast (hf_name, tensor) pairs to every engine, which load them; after in-flight
        generations finished. Sets `version` (default: version + 1)."""
        new_version = self.version + 1 if version is None else int(version)
        stats, replies = self._broadcast("load", named_tensors, max_bucket_bytes, {"version": new_version})
        self.version = new_version
        return stats

    def verify_weights(self, named_tensors, atol: float = 0.0,
                       max_bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> RemoteWeightCheck:
        """Every engine compares its own weights with the stream; merged (ok only if all engines are)."""
        _, replies = self._broadcast("verify", named_tensors, max_bucket_bytes, {"atol": float(atol)})
        checks = [rep["check"] for rep in replies]
        merged = RemoteWeightCheck(per_engine=checks)
        for c in checks:
            merged.num_checked = max(merged.num_checked, c.num_checked)
            merged.max_abs_diff = max(merged.max_abs_diff, c.max_abs_diff)
            for name, d in c.mismatched.items():
                merged.mismatched[name] = max(d, merged.mismatched.get(name, d))
            merged.missing = sorted(set(merged.missing) | set(c.missing))
            merged.shape_mismatch.update(c.shape_mismatch)
            merged.not_checked = sorted(set(merged.not_checked) | set(c.not_checked))
        return merged

    def _broadcast(self, kind: str, named_tensors, max_bucket_bytes: int, extra: dict):
        self._usable(kind)
        self.drain()
        try:
            return self._broadcast_unchecked(kind, named_tensors, max_bucket_bytes, extra)
        except EngineError as e:
            if e.fatal:
                self._broken = self._broken or str(e)
            raise

    def _broadcast_unchecked(self, kind: str, named_tensors, max_bucket_bytes: int, extra: dict):
        cfg, what = self.config, f"weight {kind}"
        req_id = next(self._ids)
        asked = []
        try:
            for link in self._links:
                link.send({"type": kind, "id": req_id, **extra}, what)
                asked.append(link)
            for link in self._links:
                link.wait((req_id, "ready"), cfg.request_timeout_s, what)
        except EngineError:
            for link in asked:   # release the live ones before any collective (they await go / cancel)
                if not link.dead:
                    try:
                        link.send({"type": "cancel"}, what)
                    except EngineError:
                        pass
            raise
        for link in self._links:    # all present: now every engine enters the receive loop
            link.send({"type": "go"}, what)
        t0, stats = time.perf_counter(), SyncStats()
        source_error = None
        try:
            for bucket in plan_buckets(named_tensors, max_bucket_bytes):
                try:
                    self._group.send_bucket(bucket)
                except Exception as e:
                    raise self._collective_error(e, what) from e
                nbytes = sum(t.numel() * t.element_size() for _, t in bucket)   # payload, not padding
                stats.num_buckets += 1
                stats.num_tensors += len(bucket)
                stats.num_bytes += nbytes
                stats.max_bucket_bytes_seen = max(stats.max_bucket_bytes_seen, nbytes)
        except EngineError:
            raise
        except Exception as e:      # the learner's own stream failed: let the engines leave their loop
            source_error = e
        try:
            self._group.send_end(abort=source_error is not None)
        except Exception as e:
            raise self._collective_error(e, what) from e
        replies = []
        errors = []
        for link in self._links:
            try:
                replies.append(link.wait(req_id, cfg.request_timeout_s, what))
            except EngineError as e:
                errors.append(e)
        if source_error is not None:
            raise source_error
        if errors:
            raise errors[0]
        stats.seconds = time.perf_counter() - t0
        return stats, replies

    def _collective_error(self, exc: Exception, what: str) -> EngineError:
        """A failed broadcast does not say who failed: give the control connections a moment to
        report a death, then name the dead (or, failing that, report the collective's own error)."""
        self._broken = f"{what} failed: {exc}"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            dead = [link for link in self._links if link.dead]
            if dead:
                return dead[0].error(dead[0].dead, what)
            time.sleep(0.1)
        return EngineError(None, f"rollout engines: {what} failed in the weight group ({exc}); every engine's "
                                 "control connection is still open")

    # ---- lifecycle -----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for every in-flight generation (their rollouts stay in their handles)."""
        for handle in list(self._inflight):
            handle._collect()     # a request's own error stays in its handle, for result() to raise
        if self._broken:
            self._usable("continue")

    def _usable(self, what: str) -> None:
        if self._broken:
            raise EngineError(None, f"rollout engines unusable after an earlier failure ({self._broken}); "
                                    f"cannot {what}: restart the job")
        if self._group is None:
            raise RuntimeError("RemoteEngines: call connect() first")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Ask every live engine to exit, close the connections, reap local processes."""
        for link in self._links:
            if not link.dead:
                try:
                    req = next(self._ids)
                    link.send({"type": "shutdown", "id": req}, "shutdown")
                    link.wait(req, timeout_s, "shutdown")
                except EngineError as e:
                    log.warning("%s", e)
            link.close()
        self._links = []
        for p in self.processes:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._broken = self._broken or "shut down"

    def __enter__(self) -> "RemoteEngines":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_local_engines(engine_config, num_engines: int, rendezvous: str = "127.0.0.1:0",
                        log_dir: Optional[str] = None, connect: bool = True,
                        **config_kw) -> tuple[RemoteEngines, list[subprocess.Popen]]:
    """Single machine (CPU tests, the end-to-end test): start `num_engines` engine server processes on
    loopback and connect to them. `config_kw` go to RemoteConfig (timeouts, backend). Engine output
    goes to log_dir/engine<i>.log when given (else it is inherited). connect=False returns at once
    (call `client.connect()` later: the engines start meanwhile). Each server leads its own process
    session, so `os.killpg(p.pid, SIGKILL)` also ends its vLLM engine-core child. On a failure here
    every started process is killed. The job's secret: config_kw["secret"], else $MEGATRON_RL_SECRET, else
    a fresh one made here (this process starts every server, so it can hand it over); it reaches the
    servers through their environment, never their command line (visible to every user in `ps`).
    Each server gets a parent-death signal (it dies with this process, and kills its vLLM children)."""
    secret = config_kw.pop("secret", None) or os.environ.get(SECRET_ENV) or new_secret()
    client = RemoteEngines(RemoteConfig(rendezvous=rendezvous, num_engines=num_engines, secret=secret,
                                        **config_kw), engine_config)
    env = child_env(**{SECRET_ENV: secret})
    procs = []
    try:
        for i in range(num_engines):
            out = open(os.path.join(log_dir, f"engine{i}.log"), "w") if log_dir else None
            cmd = [sys.executable, "-m", "megatron_rl.rollout.remote", "serve", "--rendezvous", client.rendezvous,
                   "--engine-rank", str(i), "--num-engines", str(num_engines),
                   "--startup-timeout", str(client.config.startup_timeout_s)]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                          start_new_session=True))
            if out:
                out.close()
        client.processes = procs
        if connect:
            client.connect()
    except BaseException:
        kill_local_engines(procs)
        raise
    return client, procs


def kill_local_engines(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL each server's process group (the server and its vLLM children) and reap the servers."""
    import signal

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        p.wait()


if __name__ == "__main__":
    from megatron_rl.rollout.remote_server import main

    sys.exit(main())
