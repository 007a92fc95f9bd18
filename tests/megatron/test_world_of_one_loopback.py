"""A world of one (megatron.parallel.init_world without torchrun) rendezvouses on loopback only: its
TCPStore must not listen on every interface (torch's default for a store server, whatever host it is
given). In a subprocess, so this test process's own torch.distributed state is untouched."""

import subprocess
import sys
import textwrap

import pytest

psutil = pytest.importorskip("psutil")

_CHILD = textwrap.dedent("""
    import os, psutil, torch.distributed as dist
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    from megatron_rl.megatron.parallel import init_world
    assert init_world(export_env=True)
    port = int(os.environ["MASTER_PORT"])
    listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    print("PORT", port)
    print("LISTEN", " ".join(f"{ip}:{p}" for ip, p in listening))
    dist.barrier()   # the group works on that store
    dist.destroy_process_group()
""")


def test_world_of_one_listens_on_loopback_only():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("PORT", "LISTEN")))
    port = int(lines["PORT"])
    listening = [a.rsplit(":", 1) for a in lines["LISTEN"].split()]
    assert ["127.0.0.1", str(port)] in listening, listening         # the store, on loopback
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening  # nothing (store, gloo) on other interfaces
