"""Wire layer of the disaggregated rollout (remote.py): control messages and the weight-broadcast group.

Two channels connect the learner's rank 0 ("client", group rank 0) with R engine servers (group ranks
1..R), both rooted in ONE TCPStore that the client hosts at the rendezvous address:

- control: one TCP socket per engine, length-prefixed pickles (requests, rollouts, acks, heartbeats).
  A socket rather than store keys because a dead peer shows up at once as EOF, and a blocking read can
  be bounded by a deadline. Pickle means the network between learner and engines must be trusted
  (the same assumption torch.distributed makes).
- weights: a process group of its own (never the learner's default world, which Megatron owns), built
  directly on the store: gloo on CPU, NCCL on GPU (vLLM's PyNcclCommunicator over its
  StatelessProcessGroup when importable, else torch's ProcessGroupNCCL). A bucket is broadcast once as
  three collectives: a header [meta_bytes, data_bytes], the pickled per-tensor metadata, and one flat
  uint8 buffer holding every tensor (16-byte aligned so each slice can be viewed as its dtype).
"""

from __future__ import annotations

import datetime
import os
import pickle
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

def send_msg(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(_HEADER.pack(len(data)))
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the peer")
        got += k
    return buf


def recv_msg(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, n))


def parse_address(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what}: expected HOST:PORT, got {addr!r}")
    return host, int(port)


class Link:
    """The client's end of one engine's control socket. A reader thread files replies by id and notes
    the time of every message (heartbeats included), so a waiting caller can tell a slow engine (still
    beating) from a dead one (EOF, or silence longer than `heartbeat_timeout_s`)."""

    def __init__(self, engine_rank: int, num_engines: int, address: str, sock: socket.socket,
                 heartbeat_timeout_s: float, exit_code: Optional[Callable[[], Optional[int]]] = None):
        self.engine_rank, self.address = engine_rank, address
        self.label = f"rollout engine {engine_rank} of {num_engines} ({address})"
        self.sock = sock
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
                msg = recv_msg(self.sock)
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
            send_msg(self.sock, msg)
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
        meta_bytes = pickle.dumps(meta)
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
        meta = pickle.loads(meta_t.cpu().numpy().tobytes())
        data = torch.empty(data_len, dtype=torch.uint8, device=self.device)
        self._bcast(data)
        # clones: safetensors (the engine's load path) refuses tensors that share one storage
        return [(name, data[off: off + nbytes].view(getattr(torch, dtype)).view(shape).clone())
                for name, dtype, shape, off, nbytes in meta]


class StreamAborted(RuntimeError):
    pass
