"""Wire layer of the disaggregated rollout (remote.py): control messages and the weight-broadcast group.

Two channels connect the learner's rank 0 ("client", group rank 0) with R engine servers (group ranks
1..R), both rooted in ONE TCPStore that the client hosts at the rendezvous address:

- control: one TCP socket per engine, length-prefixed pickles (requests, rollouts, acks, heartbeats).
  A socket rather than store keys because a dead peer shows up at once as EOF, and a blocking read can
  be bounded by a deadline. Pickle runs code on load, so every connection is authenticated first with
  the job's secret (MEGATRON_RL_SECRET): a mutual HMAC challenge-response, then an HMAC-SHA256 over every
  message (session key, direction, sequence number, length, payload) checked BEFORE it is unpickled.
  A peer without the secret never gets a byte unpickled. Not encrypted: see docs/disaggregated.md.
- weights: a process group of its own (never the learner's default world, which Megatron owns), built
  directly on the store: gloo on CPU, NCCL on GPU (vLLM's PyNcclCommunicator over its
  StatelessProcessGroup when importable, else torch's ProcessGroupNCCL). A bucket is broadcast once as
  three collectives: a header [meta_bytes, data_bytes], the per-tensor metadata as JSON (never a
  pickle: the group itself is not authenticated), and one flat uint8 buffer holding every tensor (16-byte aligned so each slice can be viewed as its dtype).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import pickle
import secrets
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

import torch

_HEADER = struct.Struct("!Q")
_ALIGN = 16
END, ABORT = 0, -1          # header[0] values that end a bucket stream (ABORT: the learner's stream failed)


class EngineError(RuntimeError):
    """A remote rollout engine died, timed out, or failed a request; `engine_rank` names it (None when
    the failure cannot be pinned on one). `fatal`: the engines are unusable from now on (death, timeout,
    broken weight group); False when the engine only reported an exception and is still consistent."""

    def __init__(self, engine_rank: Optional[int], message: str, fatal: bool = True):
        super().__init__(message)
        self.engine_rank, self.fatal = engine_rank, fatal


# ---- control channel ---------------------------------------------------------------------------------

SECRET_ENV = "MEGATRON_RL_SECRET"     # the per-job secret; launch.sh generates one and exports it to every node
_MIN_SECRET_CHARS = 32
_MAGIC = b"MRL-CTRL-HMAC-1\n"       # greeting + protocol version: an old or foreign peer fails at once
_NONCE = 32
_MAC = hashlib.sha256().digest_size


class AuthError(ConnectionError):
    """A peer failed authentication (wrong secret, not our protocol) or a message failed its MAC."""


def new_secret() -> str:
    return secrets.token_hex(32)


def load_secret(value: Optional[str] = None, environ=None, what: str = "disaggregated rollout") -> bytes:
    """The job's secret: `value` when given, else $MEGATRON_RL_SECRET; missing or short ones are refused
    (there is no insecure default: a process without it must not start a control channel)."""
    environ = os.environ if environ is None else environ
    value = value if value is not None else environ.get(SECRET_ENV)
    if not value:
        raise ValueError(f"{what}: environment variable {SECRET_ENV} is not set. Every learner and engine "
                         f"process of the job needs the same secret (launch.sh exports one per job; by hand: "
                         f"export {SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))'))")
    if len(value) < _MIN_SECRET_CHARS:
        raise ValueError(f"{what}: {SECRET_ENV} is {len(value)} characters; use at least {_MIN_SECRET_CHARS} "
                         "(e.g. secrets.token_hex(32))")
    return value.encode()


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


def sign(secret: bytes, data: bytes) -> str:
    """Hex MAC of `data` under the job's secret (the settings the client writes into the store)."""
    return _hmac(secret, b"mrl-sign", data).hex()


def verify_signature(secret: bytes, data: bytes, mac: str) -> bool:
    return hmac.compare_digest(sign(secret, data), mac)


class Channel:
    """An authenticated control connection (from `server_handshake` / `client_handshake`). Frame: 8-byte
    length, 32-byte MAC, payload (a pickle). MAC = HMAC-SHA256(session key, direction, sequence, length,
    payload): the session key is fresh per connection (both nonces), so a frame recorded elsewhere is
    useless; the direction and the sequence number stop reflection, replay, reordering and dropping
    within the connection. The MAC is checked before pickle.loads: nothing unauthenticated is unpickled."""

    def __init__(self, sock: socket.socket, key: bytes, send_label: bytes, recv_label: bytes):
        self.sock, self._key = sock, key
        self._send_label, self._recv_label = send_label, recv_label
        self._send_seq = self._recv_seq = 0
        self._send_lock = threading.Lock()    # the server's heartbeat thread sends too

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        with self._send_lock:
            head = _HEADER.pack(len(data))
            mac = _hmac(self._key, self._send_label, self._send_seq.to_bytes(8, "big"), head, data)
            self._send_seq += 1
            self.sock.sendall(head + mac)
            self.sock.sendall(data)

    def recv(self) -> Any:
        head = bytes(_recv_exact(self.sock, _HEADER.size))
        (n,) = _HEADER.unpack(head)
        mac = bytes(_recv_exact(self.sock, _MAC))
        data = _recv_exact(self.sock, n)
        want = _hmac(self._key, self._recv_label, self._recv_seq.to_bytes(8, "big"), head, data)
        if not hmac.compare_digest(mac, want):
            raise AuthError(f"message {self._recv_seq} failed its MAC (forged, corrupted or replayed): "
                            "refused before unpickling")
        self._recv_seq += 1
        return pickle.loads(data)

    def close(self) -> None:
        self.sock.close()


def server_handshake(sock: socket.socket, secret: bytes) -> Channel:
    """The accepting side: challenge, check the client's proof (constant-time), prove we hold the secret
    too (the client trusts our replies only then). Raises AuthError naming the reason."""
    ns = os.urandom(_NONCE)
    sock.sendall(_MAGIC + ns)
    try:
        got = bytes(_recv_exact(sock, len(_MAGIC) + _NONCE + _MAC))
    except ConnectionError as e:
        raise AuthError(f"no authentication reply ({e})") from e
    if got[:len(_MAGIC)] != _MAGIC:
        raise AuthError("not a megatron_rl control client (bad greeting)")
    nc, proof = got[len(_MAGIC):len(_MAGIC) + _NONCE], got[len(_MAGIC) + _NONCE:]
    if not hmac.compare_digest(proof, _hmac(secret, b"client", ns, nc)):
        raise AuthError(f"wrong secret (its challenge response does not match this job's {SECRET_ENV})")
    sock.sendall(_hmac(secret, b"server", ns, nc))
    return Channel(sock, _hmac(secret, b"session", ns, nc), b"s2c", b"c2s")


def client_handshake(sock: socket.socket, secret: bytes) -> Channel:
    """The connecting side of server_handshake."""
    try:
        got = bytes(_recv_exact(sock, len(_MAGIC) + _NONCE))
        if got[:len(_MAGIC)] != _MAGIC:
            raise AuthError("the peer is not a megatron_rl engine server (bad greeting)")
        ns, nc = got[len(_MAGIC):], os.urandom(_NONCE)
        sock.sendall(_MAGIC + nc + _hmac(secret, b"client", ns, nc))
        proof = bytes(_recv_exact(sock, _MAC))
    except AuthError:
        raise
    except (ConnectionError, OSError) as e:
        raise AuthError(f"the engine closed the connection during authentication ({e}): does it hold the "
                        f"same {SECRET_ENV}? (its log names the reason)") from e
    if not hmac.compare_digest(proof, _hmac(secret, b"server", ns, nc)):
        raise AuthError(f"the engine's proof does not match: it does not hold this job's {SECRET_ENV}")
    return Channel(sock, _hmac(secret, b"session", ns, nc), b"c2s", b"s2c")


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def bind_address(host: str) -> str:
    """The local address to listen on for `host` (the configured / advertised one): that interface only.
    "" / "0.0.0.0" / "*" mean every interface, on request only. A cluster hostname that resolves to a
    loopback address here (Debian's 127.0.1.1 line in /etc/hosts) would be unreachable from other
    nodes: then every interface, with a warning (the channel is authenticated either way)."""
    if host in ("", "0.0.0.0", "*"):
        return ""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve the address to listen on, {host!r}: {e}") from e
    if addr.startswith("127.") and not host.startswith("127."):
        import logging

        logging.getLogger(__name__).warning("%s resolves to the loopback address %s here: listening on every "
                                            "interface so other nodes can connect", host, addr)
        return ""
    return addr


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on bind_address(host) (SO_REUSEADDR, as torch's store sets it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind_address(host), port))
    sock.listen(128)
    return sock


def host_store(host: str, port: int, timeout_s: float):
    """A TCPStore server listening on `host`'s interface only. TCPStore has no host-binding option (it
    listens on every interface); it does accept an already listening socket (master_listen_fd)."""
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    return torch.distributed.TCPStore(host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                                      wait_for_workers=False, master_listen_fd=sock.detach())


def parse_address(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what}: expected HOST:PORT, got {addr!r}")
    return host, int(port)


class Link:
    """The client's end of one engine's control socket. A reader thread files replies by id and notes
    the time of every message (heartbeats included), so a waiting caller can tell a slow engine (still
    beating) from a dead one (EOF, or silence longer than `heartbeat_timeout_s`)."""

    def __init__(self, engine_rank: int, num_engines: int, address: str, channel: Channel,
                 heartbeat_timeout_s: float, exit_code: Optional[Callable[[], Optional[int]]] = None):
        self.engine_rank, self.address = engine_rank, address
        self.label = f"rollout engine {engine_rank} of {num_engines} ({address})"
        self.channel, self.sock = channel, channel.sock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._exit_code = exit_code            # a locally started process's poll(), for better messages
        self._cond = threading.Condition()
        self._replies: dict[Any, Any] = {}
        self.dead: Optional[str] = None
        self.last_seen = time.monotonic()
        self._reader = threading.Thread(target=self._read, name=f"mrl-engine-{engine_rank}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                msg = self.channel.recv()
                with self._cond:
                    self.last_seen = time.monotonic()
                    if msg.get("type") != "heartbeat":
                        self._replies[msg["id"]] = msg
                    self._cond.notify_all()
        except Exception as e:   # EOF, reset, or our own close()
            with self._cond:
                if self.dead is None:
                    self.dead = f"its control connection closed ({e})"
                self._cond.notify_all()

    def error(self, reason: str, what: str) -> EngineError:
        code = self._exit_code() if self._exit_code else None
        deadline = time.monotonic() + 2.0
        while code is None and self._exit_code and self.dead and time.monotonic() < deadline:
            time.sleep(0.05)      # the socket closes a moment before the killed process can be reaped
            code = self._exit_code()
        extra = f"; its process exited with code {code}" if code is not None else ""
        return EngineError(self.engine_rank, f"{self.label}: {reason}{extra} (during {what})")

    def send(self, msg: dict, what: str) -> None:
        if self.dead:
            raise self.error(self.dead, what)
        try:
            self.channel.send(msg)
        except OSError as e:
            with self._cond:
                self.dead = self.dead or f"sending failed ({e})"
            raise self.error(self.dead, what) from e

    def wait(self, key: Any, timeout_s: float, what: str) -> dict:
        """The reply filed under `key`; raises EngineError on death, silence or the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._replies:
                if self.dead:
                    raise self.error(self.dead, what)
                now = time.monotonic()
                if now - self.last_seen > self.heartbeat_timeout_s:
                    raise self.error(f"no message or heartbeat for {now - self.last_seen:.0f} s "
                                     f"(heartbeat_timeout_s={self.heartbeat_timeout_s:g})", what)
                if now > deadline:
                    raise self.error(f"no reply within {timeout_s:g} s", what)
                self._cond.wait(timeout=min(1.0, max(deadline - now, 0.01)))
            reply = self._replies.pop(key)
        if reply.get("error"):
            raise EngineError(self.engine_rank, f"{self.label} failed {what}:\n{reply['error']}", fatal=False)
        return reply

    def close(self) -> None:
        with self._cond:
            self.dead = self.dead or "closed by the client"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---- weight group --------------------------------------------------------------------------------------

def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


class WeightGroup:
    """Rank 0 (the learner) broadcasts buckets; ranks 1..R receive them. Built on a store every member
    reaches (a PrefixStore keeps its keys apart from the control keys)."""

    def __init__(self, store, rank: int, size: int, backend: str, timeout_s: float, host: str):
        self.rank, self.size, self.backend = rank, size, backend
        store = torch.distributed.PrefixStore("mrl_weights", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            self.device = torch.device("cpu")
            opts = torch.distributed.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # bind where the peers can reach us: GLOO_SOCKET_IFNAME (as torch.distributed honours it)
            # or the address this process advertised; the hostname's default may resolve to loopback
            ifname = os.environ.get("GLOO_SOCKET_IFNAME")
            opts._devices = [torch.distributed.ProcessGroupGloo.create_device(interface=ifname) if ifname
                             else torch.distributed.ProcessGroupGloo.create_device(hostname=host)]
            self._pg = torch.distributed.ProcessGroupGloo(store, rank, size, opts)
            self._bcast = self._gloo_broadcast
        elif backend == "nccl":   # GPU path: not exercised by the CPU test suite
            if not torch.cuda.is_available():
                raise RuntimeError("weight group backend 'nccl' needs CUDA; use 'gloo' on CPU")
            self.device = torch.device("cuda", torch.cuda.current_device())
            try:
                from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
                from vllm.distributed.utils import StatelessProcessGroup
            except ImportError:
                opts = torch.distributed.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                self._pg = torch.distributed.ProcessGroupNCCL(store, rank, size, opts)
                self._bcast = self._gloo_broadcast    # same c10d call shape
            else:
                spg = StatelessProcessGroup(rank=rank, world_size=size, store=store)
                self._comm = PyNcclCommunicator(spg, device=self.device)
                self._bcast = self._pynccl_broadcast
        else:
            raise ValueError(f"weight group backend must be gloo or nccl, got {backend!r}")

    def _gloo_broadcast(self, t: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self._pg.broadcast([t], opts).wait()

    def _pynccl_broadcast(self, t: torch.Tensor) -> None:
        self._comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()

    # -- sender (rank 0) --
    def send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        meta, offset = [], 0
        for name, t in bucket:
            nbytes = t.numel() * t.element_size()
            meta.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        meta_bytes = json.dumps(meta).encode()
        self._bcast(torch.tensor([len(meta_bytes), offset], dtype=torch.int64, device=self.device))
        self._bcast(torch.frombuffer(bytearray(meta_bytes), dtype=torch.uint8).to(self.device))
        data = torch.empty(offset, dtype=torch.uint8, device=self.device)
        for (name, t), (_, _, _, off, nbytes) in zip(bucket, meta):
            if nbytes:
                data[off: off + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        self._bcast(data)
        return offset

    def send_end(self, abort: bool = False) -> None:
        self._bcast(torch.tensor([ABORT if abort else END, 0], dtype=torch.int64, device=self.device))

    # -- receivers --
    def recv_bucket(self) -> Optional[list[tuple[str, torch.Tensor]]]:
        """The next bucket; None at the end of the stream; raises on an aborted stream."""
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._bcast(header)
        meta_len, data_len = (int(x) for x in header.tolist())
        if meta_len == END:
            return None
        if meta_len == ABORT:
            raise StreamAborted("the learner aborted the weight stream (its iterator raised)")
        meta_t = torch.empty(meta_len, dtype=torch.uint8, device=self.device)
        self._bcast(meta_t)
        meta = json.loads(meta_t.cpu().numpy().tobytes())
        data = torch.empty(data_len, dtype=torch.uint8, device=self.device)
        self._bcast(data)
        # clones: safetensors (the engine's load path) refuses tensors that share one storage
        return [(name, data[off: off + nbytes].view(getattr(torch, dtype)).view(shape).clone())
                for name, dtype, shape, off, nbytes in meta]


class StreamAborted(RuntimeError):
    pass
