"""The control channel's authentication (item 9) and the engine server's process lifetime (item 15), without
a vLLM engine: the real server code (accept loop, handshake, Channel, tie_to_parent) on loopback. The
end-to-end checks against real engine servers are in test_remote.py."""

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from megatron_rl.rollout import remote_comm as rc
from megatron_rl.rollout import remote_server as rs

SECRET = rc.load_secret("s" * 40)
OTHER = rc.load_secret("o" * 40)


class Marker:
    """Unpickling this writes a file: the proof that a payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def server(caplog):
    """A listener on loopback and the server's accept loop in a thread; yields (address, result box)."""
    caplog.set_level(logging.WARNING, logger=rs.__name__)
    listener = rc.listen_socket("127.0.0.1")
    box = {}

    def run():
        try:
            box["channel"] = rs.accept_client(listener, SECRET, 60, "engine 0/1")
            box["msg"] = box["channel"].recv()
        except Exception as e:   # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield listener.getsockname(), box, t
    listener.close()


def test_secret_is_required_and_long():
    with pytest.raises(ValueError, match="MEGATRON_RL_SECRET is not set"):
        rc.load_secret(environ={})
    with pytest.raises(ValueError, match="at least 32"):
        rc.load_secret("short")
    assert len(rc.new_secret()) == 64


def test_wrong_secret_and_raw_pickles_are_refused_and_logged_then_the_client_is_served(server, caplog, tmp_path):
    addr, box, t = server
    # a client with the wrong secret: refused on both sides, the server logs the peer and the reason
    bad = socket.create_connection(addr)
    with pytest.raises(rc.AuthError, match="closed the connection during authentication"):
        rc.client_handshake(bad, OTHER)
    bad_port = bad.getsockname()[1]
    bad.close()
    # an old-protocol peer sending a bare length-prefixed pickle: never unpickled
    marker = tmp_path / "ran"
    raw = socket.create_connection(addr)
    payload = pickle.dumps(Marker(marker))
    raw.sendall(len(payload).to_bytes(8, "big") + payload + b"\0" * 64)
    raw.settimeout(30)
    try:
        while raw.recv(4096):      # read the greeting until the server closes (or resets: unread bytes)
            pass
    except ConnectionResetError:
        pass
    raw.close()
    # the right client is still accepted and its message arrives
    good = socket.create_connection(addr)
    ch = rc.client_handshake(good, SECRET)
    ch.send({"type": "ping", "id": 1})
    t.join(30)
    assert box.get("msg") == {"type": "ping", "id": 1}, box
    assert not marker.exists()
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert f"refused connection from 127.0.0.1:{bad_port}: wrong secret" in refusals[0]
    assert "bad greeting" in refusals[1]
    good.close()


def test_a_server_without_the_secret_is_refused_by_the_client(server):
    """Mutual: a server that does not hold the secret cannot make the client unpickle its replies."""
    addr, _, _ = server
    listener = rc.listen_socket("127.0.0.1")
    box = {}

    def fake_server():    # accepts with the wrong secret
        conn, _ = listener.accept()
        ns = os.urandom(32)
        conn.sendall(rc._MAGIC + ns)
        conn.recv(4096)
        conn.sendall(os.urandom(32))
        box["done"] = True

    threading.Thread(target=fake_server, daemon=True).start()
    sock = socket.create_connection(listener.getsockname())
    with pytest.raises(rc.AuthError, match="does not hold this job's MEGATRON_RL_SECRET"):
        rc.client_handshake(sock, SECRET)
    sock.close()
    listener.close()


def _pair():
    a, b = socket.socketpair()
    key = b"k" * 32
    return rc.Channel(a, key, b"c2s", b"s2c"), rc.Channel(b, key, b"s2c", b"c2s")


def test_a_forged_message_is_refused_before_unpickling(tmp_path):
    client, server = _pair()
    client.send({"id": 0})
    assert server.recv() == {"id": 0}
    marker = tmp_path / "ran"
    payload = pickle.dumps(Marker(marker))
    # a forged frame injected into an authenticated connection: right framing, MAC without the key
    head = len(payload).to_bytes(8, "big")
    client.sock.sendall(head + os.urandom(32) + payload)
    with pytest.raises(rc.AuthError, match="failed its MAC.*before unpickling"):
        server.recv()
    assert not marker.exists()


def test_replayed_and_reflected_frames_fail_their_mac():
    client, server = _pair()
    # capture one frame off the wire and send it twice: the second has a stale sequence number
    a, b = socket.socketpair()
    tap = rc.Channel(a, b"k" * 32, b"c2s", b"s2c")
    tap.send({"id": 1})
    frame = b.recv(65536)
    client.sock.sendall(frame)
    assert server.recv() == {"id": 1}
    client.sock.sendall(frame)
    with pytest.raises(rc.AuthError):
        server.recv()
    # a frame the server sent, reflected back to it, carries the other direction's label
    c2, s2 = _pair()
    s2.send({"id": 2})
    reflected = c2.sock.recv(65536)
    c2.sock.sendall(reflected)
    with pytest.raises(rc.AuthError):
        s2.recv()


def test_the_store_settings_need_the_secrets_mac():
    raw = b'{"num_engines": 1}'
    mac = rc.sign(SECRET, raw)
    assert rc.verify_signature(SECRET, raw, mac)
    assert not rc.verify_signature(OTHER, raw, mac)
    assert not rc.verify_signature(SECRET, raw.replace(b"1", b"2"), mac)


def test_listeners_bind_the_configured_interface_only():
    sock = rc.listen_socket("127.0.0.1")
    assert sock.getsockname()[0] == "127.0.0.1"
    sock.close()
    assert rc.bind_address("localhost") == "127.0.0.1" and rc.bind_address("0.0.0.0") == ""
    store = rc.host_store("127.0.0.1", 0, 30)
    psutil = pytest.importorskip("psutil")
    listening = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", store.port) in {(a.ip, a.port) for a in listening}
    assert not any(a.port == store.port and a.ip != "127.0.0.1" for a in listening)


# ---- process lifetime (item 15) ------------------------------------------------------------------------

# parent -> server stand-in (tie_to_parent, its own session, as start_local_engines / node_main start a server)
#   -> two grandchildren, one of them in a new session of its own re-parented below (like vLLM's engine core
#   and its worker); the parent is SIGKILLed: every descendant must go
_SERVER = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_rl.rollout.remote_server import tie_to_parent
    tie_to_parent(poll_s=0.2)
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    print(" ".join(str(k.pid) for k in kids), flush=True)
    time.sleep(600)
""")
_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_rl.rollout.remote_server import child_env
    p = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=child_env(), stdout=sys.stdout,
                         start_new_session=True)
    print(p.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("blocked", [False, True])
def test_killing_the_parent_ends_the_server_and_all_its_descendants(blocked):
    """blocked: the server's main thread sits in C code that ignores signals' Python handlers (as in a
    gloo collective): the watchdog thread must still end the tree."""
    server = _SERVER
    if blocked:   # block SIGTERM in the main thread only after the children started (the last sleep)
        server = _SERVER.rsplit("time.sleep(600)", 1)[0] + \
            "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); time.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, server], stdout=subprocess.PIPE, text=True, env=env)
    try:
        server_pid = int(parent.stdout.readline())
        kids = [int(x) for x in parent.stdout.readline().split()]
        tree = [server_pid] + kids
        assert all(_alive(p) for p in tree)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in tree if _alive(p)] == [], "descendants outlived the killed parent"
    finally:
        parent.kill()
        for p in locals().get("tree", []):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
