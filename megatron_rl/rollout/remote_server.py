"""The engine server of the disaggregated rollout: one process, one RolloutEngine, group rank i + 1.

    python -m megatron_rl.rollout.remote serve --rendezvous HOST:PORT --engine-rank I --num-engines R
    python -m megatron_rl.rollout.remote node  --rendezvous HOST:PORT --node-index J --engines-per-node K \
        --num-engines R [--gpus-per-engine T]       (launch.sh: K servers on one node, T GPUs each)

Start-up: connect to the client's TCPStore (retrying until --startup-timeout), read the client's
settings (backend, timeouts and, unless --config-json is given, the EngineConfig: the learner's
config is the single source of truth), build the engine, listen on a free port and publish
"mrl/engine/I/addr", join the weight group (blocks until every member joined), accept the client's
control connection, then serve requests ONE AT A TIME in arrival order. That serialisation is the
whole consistency story: a weight update never interleaves with a generation, and every rollout
carries the version of the weights it was generated with. A heartbeat thread reports liveness while
a request runs. The server exits when the client says shutdown or its connection closes.

Trust: a server refuses to start without $MEGATRON_RL_SECRET (no generated fallback: a secret only the
server knew would be useless, and printing it would leak it into logs); it uses the store's settings
only if they carry the secret's MAC, listens on the advertised interface only, and accepts only a
client that passes the HMAC handshake (remote_comm); every other peer is logged and refused.

Lifetime: the server dies with its parent (PR_SET_PDEATHSIG + a watchdog thread), and whenever it
goes (shutdown, SIGTERM, parent death, an error) it first SIGKILLs its descendants (vLLM's engine core
and workers, which vLLM starts and would otherwise outlive the job) and, when it leads its process
group, the group.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Optional

import psutil     # imported up front: the kill path runs in signal handlers, where an import can be re-entered
import torch

from megatron_rl.rollout.remote_comm import (SECRET_ENV, AuthError, Channel, StreamAborted, WeightGroup, listen_socket,
                                             load_secret, parse_address, server_handshake, verify_signature)
from megatron_rl.utils import lifetime

log = logging.getLogger(__name__)
SETTINGS_KEY, SETTINGS_MAC_KEY = "mrl/settings", "mrl/settings_mac"
PARENT_PID_ENV = "MRL_PARENT_PID"     # set by whoever starts a server: closes the start-up race of the death signal
HANDSHAKE_TIMEOUT_S = 10.0            # a peer that connects and stays silent must not block the listener


# ---- process lifetime ----------------------------------------------------------------------------------

def kill_descendants() -> None:
    """SIGKILL every process below this one (vLLM's engine core and its workers) and, when this process
    leads its own process group, the rest of the group (children that were re-parented away), but not
    this process itself."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        kids = []
    for kid in kids:
        try:
            kid.kill()
        except psutil.Error:
            pass
    me = os.getpid()
    if os.getpgid(0) == me:       # our group, minus ourselves (the caller's exit code must survive)
        for proc in psutil.process_iter():
            try:
                if proc.pid != me and os.getpgid(proc.pid) == me:
                    proc.kill()
                    kids.append(proc)
            except (psutil.Error, OSError):
                pass
    psutil.wait_procs(kids, timeout=5)


_dying = threading.Event()


def _die(code: int, why: str) -> None:
    """Kill the descendants and exit, once: the death signal's handler and the watchdog thread can both
    fire (and a handler can interrupt the first caller); only the first one acts, the others return."""
    if _dying.is_set():
        return
    _dying.set()
    log.warning("%s: killing my descendants and exiting", why)
    logging.shutdown()
    kill_descendants()
    os._exit(code)


def tie_to_parent(poll_s: float = 1.0) -> None:
    """Die with the parent process. The death signal (SIGTERM, handled: the handler kills the descendants
    first) is the fast path; a watchdog thread that polls the parent pid is the sure one (a handler only
    runs when the main thread returns to Python, and a parent that died before the prctl call sends no
    signal). The expected parent is $MRL_PARENT_PID when the starter set it, else the current one."""
    parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    signal.signal(signal.SIGTERM, lambda *_: _die(143, "SIGTERM"))   # before arming: it may come at once
    lifetime.tie_to_parent(parent, signal.SIGTERM, lambda why: _die(1, why), poll_s)


def child_env(environ=None, **extra) -> dict:
    """The environment for a server process this process starts (its parent pid for tie_to_parent)."""
    return {**(os.environ if environ is None else environ), PARENT_PID_ENV: str(os.getpid()), **extra}


def engine_addr_key(engine_rank: int) -> str:
    return f"mrl/engine/{engine_rank}/addr"


def engine_config_from_dict(d: dict):
    """EngineConfig from JSON-able values; an unknown key is an error that names it."""
    from megatron_rl.rollout.engine import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"rollout engine config: unknown key(s) {unknown}; known: {sorted(known)}")
    d = dict(d)
    if "stop_token_ids" in d:
        d["stop_token_ids"] = tuple(int(t) for t in d["stop_token_ids"])
    return EngineConfig(**d)


def connect_store(rendezvous: str, timeout_s: float):
    host, port = parse_address(rendezvous, "--rendezvous")
    # a store client retries the connection until the timeout: engines may start before the learner
    return torch.distributed.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


def _advertise_host(rendezvous_host: str) -> str:
    """The address of this machine as the client reaches it: the local end of a route to the store."""
    if rendezvous_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((rendezvous_host, 9))   # UDP: no packet is sent, only the route is chosen
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


class EngineServer:
    def __init__(self, rendezvous: str, engine_rank: int, num_engines: int, startup_timeout_s: float,
                 engine_config: Optional[dict] = None, advertise_host: Optional[str] = None,
                 secret: Optional[bytes] = None):
        if not 0 <= engine_rank < num_engines:
            raise ValueError(f"--engine-rank must be in [0, {num_engines}), got {engine_rank}")
        self.secret = secret if secret is not None else load_secret(what="rollout engine server")
        self.rank, self.num_engines = engine_rank, num_engines
        self.label = f"engine {engine_rank}/{num_engines}"
        self.store = connect_store(rendezvous, startup_timeout_s)
        raw = self.store.get(SETTINGS_KEY)
        # the store is torch's (unauthenticated): anyone reaching it could rewrite the settings (e.g. the
        # model path), so they count only with the client's MAC
        if not (self.store.check([SETTINGS_MAC_KEY])
                and verify_signature(self.secret, raw, self.store.get(SETTINGS_MAC_KEY).decode())):
            raise AuthError(f"{self.label}: the settings at {rendezvous} do not carry this job's MAC: the learner "
                            f"runs with a different {SECRET_ENV}, or someone else wrote them")
        settings = json.loads(raw)
        if settings["num_engines"] != num_engines:
            raise ValueError(f"--num-engines is {num_engines} but the learner expects {settings['num_engines']}")
        self.settings = settings
        self.version = int(settings.get("initial_version", 0))
        cfg = engine_config_from_dict(engine_config if engine_config is not None else settings["engine_config"])

        from megatron_rl.rollout.engine import RolloutEngine

        self.engine = RolloutEngine(cfg)
        host = advertise_host or _advertise_host(parse_address(rendezvous, "--rendezvous")[0])
        self.listener = listen_socket(host)     # the advertised interface only
        self.store.set(engine_addr_key(engine_rank), f"{host}:{self.listener.getsockname()[1]}")
        log.info("%s: engine up, joining the weight group (%s)", self.label, settings["backend"])
        self.group = WeightGroup(self.store, engine_rank + 1, num_engines + 1, settings["backend"],
                                 float(settings["collective_timeout_s"]), host)
        self.channel = accept_client(self.listener, self.secret, startup_timeout_s, self.label)
        self.conn = self.channel.sock
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # later connections are still answered (and refused, logged), so a scan or a stray peer is visible
        threading.Thread(target=refuse_forever, args=(self.listener, self.secret, self.label),
                         name="mrl-refuse", daemon=True).start()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._send({"id": "hello", "engine_rank": engine_rank, "version": self.version,
                    "start_seconds": self.engine.start_seconds})
        threading.Thread(target=self._heartbeat, name="mrl-heartbeat", daemon=True).start()

    def _send(self, msg: dict) -> None:
        with self._send_lock:
            self.channel.send(msg)

    def _heartbeat(self) -> None:
        interval = float(self.settings["heartbeat_interval_s"])
        while not self._stop.wait(interval):
            try:
                self._send({"type": "heartbeat"})
            except OSError:
                return

    # ---- requests ------------------------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while True:
                try:
                    msg = self.channel.recv()
                except AuthError as e:      # authenticated peer, forged frame: the connection is not ours
                    log.error("%s: refused a message from the client %s: %s: shutting down", self.label,
                              _peer(self.conn), e)
                    return
                except (ConnectionError, OSError):
                    log.warning("%s: the client's connection closed: shutting down", self.label)
                    return
                kind = msg["type"]
                if kind == "shutdown":
                    self._send({"id": msg["id"]})
                    return
                handler = {"generate": self._generate, "load": self._stream, "verify": self._stream,
                           "ping": lambda m: {}}.get(kind)
                try:
                    if handler is None:
                        raise ValueError(f"unknown request type {kind!r}")
                    reply = handler(msg)
                except Exception:
                    reply = {"error": traceback.format_exc()}
                self._send({"id": msg["id"], **reply})
        finally:
            self._stop.set()
            self.engine.shutdown()
            self.conn.close()

    def _generate(self, msg: dict) -> dict:
        rollout = self.engine.generate(msg["prompts"], prompt_indices=msg["prompt_indices"], step=msg["step"],
                                       n=msg["n"], infos=msg["infos"], max_tokens=msg.get("max_tokens"))
        return {"rollout": rollout, "version": self.version}

    def _stream(self, msg: dict) -> dict:
        """Receive one broadcast bucket stream and load (or compare) it. A failure to load does not stop
        the receiving: the learner's broadcast must find every member until the end marker."""
        from megatron_rl.rollout.weight_sync import WeightCheck, verify_weights

        # ready -> go: the client enters the collective only when EVERY engine is here, so one dead
        # engine cancels the stream instead of stranding the others inside a broadcast
        self._send({"id": (msg["id"], "ready")})
        follow = self.channel.recv()["type"]
        if follow == "cancel":
            return {"cancelled": True}
        if follow != "go":
            raise RuntimeError(f"weight stream: expected go or cancel after ready, got {follow!r}")
        verify = msg["type"] == "verify"
        error, loaded, sent, seconds = None, 0, set(), 0.0
        check = WeightCheck()
        while True:
            try:
                bucket = self.group.recv_bucket()
            except StreamAborted as e:
                error = error or f"{e}; buckets loaded before it stay loaded (weights may be mixed)"
                break
            if bucket is None:
                break
            if error is not None:
                continue
            t0 = time.perf_counter()
            try:
                cap = sum(t.numel() * t.element_size() for _, t in bucket) + 1   # the learner's bucket, whole
                if verify:
                    sent.update(n for n, _ in bucket)
                    _merge_check(check, verify_weights(self.engine, bucket, max_bucket_bytes=cap,
                                                       atol=msg["atol"]))
                else:
                    loaded += self.engine.update_weights(iter(bucket), max_bucket_bytes=cap).num_tensors
            except Exception:
                error = traceback.format_exc()
            seconds += time.perf_counter() - t0
        if error is not None:
            return {"error": error}
        if verify:
            check.not_checked = sorted(set(self.engine.collective_rpc("mrl_param_names")[0]) - sent)
            return {"check": check}
        self.version = int(msg["version"])
        return {"tensors": loaded, "load_seconds": seconds, "version": self.version}


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _authenticate(conn: socket.socket, secret: bytes, label: str) -> Optional[Channel]:
    """The handshake with one accepted connection; a refusal is logged (peer, reason) and closes it."""
    peer = _peer(conn)
    conn.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        channel = server_handshake(conn, secret)
    except (AuthError, OSError) as e:
        log.warning("%s: refused connection from %s: %s", label, peer, e)
        conn.close()
        return None
    conn.settimeout(None)
    return channel


def accept_client(listener: socket.socket, secret: bytes, timeout_s: float, label: str) -> Channel:
    """The first connection that authenticates, within timeout_s; refused peers do not stop the wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        listener.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise TimeoutError(f"{label}: no authenticated client connected within {timeout_s:g} s") from None
        channel = _authenticate(conn, secret, label)
        if channel is not None:
            log.info("%s: client %s authenticated", label, _peer(conn))
            return channel


def refuse_forever(listener: socket.socket, secret: bytes, label: str) -> None:
    """After the client connected: authenticate and turn away every further peer, logging each."""
    listener.settimeout(None)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        peer = _peer(conn)
        channel = _authenticate(conn, secret, label)
        if channel is not None:
            log.warning("%s: refused connection from %s: this engine already serves its client", label, peer)
            channel.close()


def _merge_check(into, part) -> None:
    into.num_checked += part.num_checked
    into.max_abs_diff = max(into.max_abs_diff, part.max_abs_diff)
    into.mismatched.update(part.mismatched)
    into.missing += part.missing
    into.shape_mismatch.update(part.shape_mismatch)


# ---- entry points ------------------------------------------------------------------------------------

def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"[engine {args.engine_rank}] %(asctime)s %(message)s")
    try:
        secret = load_secret(what="rollout engine server")   # refuse to start without it (no fallback)
    except ValueError as e:
        log.error("engine %d: %s", args.engine_rank, e)
        return 2
    tie_to_parent()
    cfg = json.loads(args.config_json) if args.config_json else None
    try:
        server = EngineServer(args.rendezvous, args.engine_rank, args.num_engines, args.startup_timeout,
                              engine_config=cfg, advertise_host=args.advertise_host, secret=secret)
        server.serve()
    except BaseException:
        log.exception("engine %d: failed", args.engine_rank)
        _die(1, f"engine {args.engine_rank} failed")
    log.info("engine %d: stopped", args.engine_rank)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    kill_descendants()     # whatever vLLM left behind after its shutdown (then the group, us included)
    # the engine is shut down explicitly above; skip interpreter teardown, which was measured to hang
    # past 30 s here (vLLM's and gloo's leftover threads and handles)
    os._exit(0)


def node_main(args: argparse.Namespace) -> int:
    """K engine servers on this node, each on its own T GPUs (a slice of CUDA_VISIBLE_DEVICES when SLURM
    set one); the first to fail brings the others down, so the step fails as a whole."""
    load_secret(what="rollout engine node")     # fail here, once, rather than in each server
    lifetime.set_parent_death_signal(signal.SIGTERM)     # srun's step dies -> this dies -> its servers die (theirs)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(args.engines_per_node * args.gpus_per_engine)]
    procs = []
    for local in range(args.engines_per_node):
        env = child_env()
        if args.gpus_per_engine:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                gpus[local * args.gpus_per_engine:(local + 1) * args.gpus_per_engine])
        rank = args.node_index * args.engines_per_node + local
        cmd = [sys.executable, "-m", "megatron_rl.rollout.remote", "serve", "--rendezvous", args.rendezvous,
               "--engine-rank", str(rank), "--num-engines", str(args.num_engines),
               "--startup-timeout", str(args.startup_timeout)]
        # own session: the server kills its group (vLLM's processes) on exit without touching this one
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    code = 0
    try:
        while procs and code == 0:
            for p in list(procs):
                rc = p.poll()
                if rc is not None:
                    procs.remove(p)
                    code = code or rc
            time.sleep(1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_rl.rollout.remote",
                                description="vLLM engine servers of the disaggregated rollout")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "node"):
        s = sub.add_parser(name)
        s.add_argument("--rendezvous", required=True, help="HOST:PORT of the learner's store (its rank 0)")
        s.add_argument("--num-engines", type=int, required=True, help="engines in the whole job")
        s.add_argument("--startup-timeout", type=float, default=1800.0,
                       help="seconds to wait for the learner and the other engines")
    serve = sub.choices["serve"]
    serve.add_argument("--engine-rank", type=int, required=True)
    serve.add_argument("--config-json", help="EngineConfig fields as JSON (default: the learner's, via the store)")
    serve.add_argument("--advertise-host", help="address the learner connects to (default: route to the store)")
    node = sub.choices["node"]
    node.add_argument("--node-index", type=int, required=True, help="0-based among the engine nodes")
    node.add_argument("--engines-per-node", type=int, required=True)
    node.add_argument("--gpus-per-engine", type=int, default=0, help="engine TP size (0: leave GPUs alone)")
    args = p.parse_args(argv)
    return serve_main(args) if args.cmd == "serve" else node_main(args)
