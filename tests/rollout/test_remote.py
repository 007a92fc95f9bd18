"""Disaggregated rollout on one CPU machine: two engine server processes on loopback, a gloo weight
group, and the learner-side client in this process. One cluster serves the whole module (an engine start
costs 15-40 s, minutes under load); the local reference engine (conftest) starts while the servers do.
The killed-engine test must stay LAST: it leaves the cluster unusable."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.rollout import EngineConfig
from megatron_rl.rollout.remote import (EngineError, RemoteConfig, kill_local_engines, start_local_engines,
                                        weight_version)
from tests.rollout.conftest import prompt_ids

QUESTIONS = ["What is 12 + 7?", "What is 3 * 4?", "Name a prime.", "What is 9 - 2?", "Spell cat."]
# generous: the CPU test machines are shared and often heavily loaded
TIMEOUTS = dict(startup_timeout_s=900, request_timeout_s=600, collective_timeout_s=300, heartbeat_interval_s=1,
                heartbeat_timeout_s=120)


def reference_config(model_dir) -> EngineConfig:
    # the same settings as conftest's `engine`, so both sample identically (checked in the first test)
    return EngineConfig(model=str(model_dir), dtype="float32", temperature=0.7, n_samples=4, max_response_tokens=16,
                        max_model_len=256, logprobs_topk=5, seed=0, kv_cache_memory_bytes=64 << 20,
                        gpu_memory_utilization=0.1)


def perturbed(sd, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()}


@pytest.fixture(scope="module")
def original(tiny_model):
    return load_file(str(tiny_model[0] / "model.safetensors"))


@pytest.fixture(scope="module")
def cluster(tiny_model, request, tmp_path_factory):
    pytest.importorskip("vllm")
    log_dir = tmp_path_factory.mktemp("engine_logs")
    t0 = time.perf_counter()
    client, procs = start_local_engines(reference_config(tiny_model[0]), 2, log_dir=str(log_dir), connect=False,
                                        **TIMEOUTS)
    try:
        request.getfixturevalue("engine")      # builds the local reference engine meanwhile
        client.connect()
        client.test_log_dir = log_dir
        print(f"\n2 engine servers + local engine up in {time.perf_counter() - t0:.0f} s (logs: {log_dir})")
        yield client, procs
    finally:
        client.shutdown(timeout_s=30)
        kill_local_engines(procs)              # no-op for servers that exited; reaps the killed one's children


def same_samples(a, b):
    assert len(a) == len(b)
    assert torch.equal(a.group_ids, b.group_ids)
    for x, y in zip(a.samples, b.samples):
        assert (x.prompt_index, x.group_id, x.sample_index, x.info, x.finish_reason) == \
               (y.prompt_index, y.group_id, y.sample_index, y.info, y.finish_reason)
        assert torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.response_ids, y.response_ids)
        assert torch.allclose(x.rollout_logprobs, y.rollout_logprobs, atol=1e-5, rtol=0)
        assert torch.equal(x.topk_ids, y.topk_ids)


def any_different(a, b):
    return any(not torch.equal(x.response_ids, y.response_ids) for x, y in zip(a.samples, b.samples))


def test_generate_splits_merges_and_matches_a_local_engine(cluster, engine, tiny_model, original):
    client, _ = cluster
    assert engine.config == client.engine_config
    assert engine.verify_weights(original.items()).ok        # the shared local engine holds the base weights
    prompts = prompt_ids(tiny_model[1], QUESTIONS)           # 5 prompts over 2 engines: 2 + 3
    idx = [10, 11, 12, 13, 14]
    infos = [{"answer": str(i)} for i in idx]
    remote = client.generate(prompts, prompt_indices=idx, step=3, infos=infos)
    local = engine.generate(prompts, prompt_indices=idx, step=3, infos=infos)
    assert len(remote) == 5 * 4
    same_samples(remote, local)                              # same seeds -> same tokens, groups in prompt order
    assert remote.group_ids.tolist() == [g for g in range(5) for _ in range(4)]
    assert weight_version(remote) == 0 == remote.weight_version and remote.stats["rollout/engines"] == 2
    assert remote.stats["rollout/response_tokens"] == local.stats["rollout/response_tokens"]

    # fewer prompts than engines works; an engine-side exception is named and not fatal
    one = client.generate(prompts[2:3], prompt_indices=[12], step=3)
    ref = [s for s in local.samples if s.prompt_index == 12]
    assert [s.group_id for s in one.samples] == [0] * 4
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(one.samples, ref))
    with pytest.raises(EngineError, match=r"(?s)rollout engine 1 of 2 .*is empty") as err:
        client.generate([[]])
    assert err.value.engine_rank == 1 and not err.value.fatal
    assert len(client.generate(prompts[:2], step=3)) == 8     # still usable


def test_every_engine_holds_the_learners_weights_after_each_broadcast(cluster, tiny_model, original):
    client, _ = cluster
    check = client.verify_weights(original.items())
    assert check.ok and check.max_abs_diff == 0 and check.num_checked == len(original) and check.not_checked == []
    prompts = prompt_ids(tiny_model[1], QUESTIONS[:2])
    before = client.generate(prompts, step=5)
    v0 = client.version
    nbytes = sum(t.numel() * t.element_size() for t in original.values())
    for k in (1, 2, 3):
        new = perturbed(original, seed=k)
        stats = client.update_weights(new.items(), max_bucket_bytes=64 << 10)   # many buckets
        assert stats.num_tensors == len(new) and stats.num_buckets >= 10 and stats.num_bytes >= nbytes
        assert client.version == v0 + k
        check = client.verify_weights(new.items())                  # one bucket
        assert check.ok, check.summary()
        assert check.max_abs_diff == 0.0 and len(check.per_engine) == 2
        assert all(c.ok and c.num_checked == len(new) and c.max_abs_diff == 0 for c in check.per_engine)
    stale = client.verify_weights(original.items())
    assert not stale.ok and all(set(c.mismatched) == set(original) for c in stale.per_engine)
    assert "engine 0:" in stale.summary() and "engine 1:" in stale.summary()
    after = client.generate(prompts, step=5)
    assert weight_version(after) == v0 + 3 and any_different(before, after)

    # a stream that fails on the learner side (a name twice) is aborted on every engine, not hung
    name, t = next(iter(original.items()))
    with pytest.raises(ValueError, match="appears twice"):
        client.update_weights([(name, t), (name, t)])
    assert client.version == v0 + 3
    client.update_weights(original.items(), version=100)      # restore; an explicit version (resume)
    assert client.version == 100 and client.verify_weights(original.items()).ok


def test_submit_overlaps_one_step_off_policy(cluster, engine, tiny_model, original):
    client, _ = cluster
    prompts = prompt_ids(tiny_model[1], QUESTIONS)
    v = client.version                                        # engines hold the base weights at v
    pending = client.submit(prompts, step=7)                  # step k+1's generation starts ...
    assert pending.weight_version == v and not pending.done()
    client.update_weights(perturbed(original, seed=4).items())   # ... the sync after step k waits for it
    assert pending.done() and client.version == v + 1
    stale = pending.result()
    assert weight_version(stale) == v                         # lag 1 for the policy at v + 1
    same_samples(stale, engine.generate(prompts, step=7))     # generated entirely with the old weights
    fresh = client.submit(prompts, step=7).result()
    assert weight_version(fresh) == v + 1 and any_different(stale, fresh)
    client.update_weights(original.items())


def test_remote_config_names_the_bad_key():
    with pytest.raises(ValueError, match="`rendezvous`"):
        RemoteConfig(rendezvous="nohost", num_engines=1)
    with pytest.raises(ValueError, match="`heartbeat_timeout_s`"):
        RemoteConfig(rendezvous="h:1", num_engines=1, heartbeat_interval_s=5, heartbeat_timeout_s=8)
    with pytest.raises(ValueError, match="MRL_NUM_ENGINES"):
        RemoteConfig.from_env({"MRL_ENGINE_RENDEZVOUS": "h:1"})
    env = {"MRL_ENGINE_RENDEZVOUS": "gpu001:31002", "MRL_NUM_ENGINES": "8"}
    with pytest.raises(ValueError, match="MEGATRON_RL_SECRET is not set"):     # at start-up, not at connect
        RemoteConfig.from_env(env)
    cfg = RemoteConfig.from_env({**env, "MEGATRON_RL_SECRET": "x" * 64}, backend="gloo")
    assert (cfg.rendezvous, cfg.num_engines, cfg.backend, cfg.secret) == ("gpu001:31002", 8, "gloo", "x" * 64)
    assert "x" * 64 not in repr(cfg)                                          # never printed


def test_launch_sh_places_engines_on_the_last_nodes(tmp_path):
    """A 5-node disaggregated job: learner on gpu001-004, 2 engines (the recipe's TP 4) on gpu005. The dry
    run prints each node's command; a real launch with srun / torchrun / the engine server faked runs
    exactly those."""
    repo = Path(__file__).resolve().parents[2]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(   # runs its command once per host of --nodelist, as SLURM's tasks would
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do [[ $1 == --nodelist=* ]] && list=${1#--nodelist=}; shift; done\n"
        "IFS=, read -ra hs <<< \"$list\"\n"
        "for i in \"${!hs[@]}\"; do SLURMD_NODENAME=${hs[$i]} SLURM_NODEID=$i \"$@\"; done\n")
    (fake / "torchrun").write_text("#!/bin/bash\nprintf 'RAN %s\\n' \"$(printf '%q ' torchrun \"$@\")\"\n")
    (fake / "python").write_text(   # the engine server is printed, everything else (the planner) runs
        "#!/bin/bash\nif [[ $2 == megatron_rl.rollout.remote ]]; then printf 'RAN %s\\n' \"$(printf '%q ' python \"$@\")\"; "
        f"exit 0; fi\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DRY_RUN": "1", "PYTHON": str(fake / "python"),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "5", "SLURM_JOB_NODELIST": "gpu[001-005]", "GPU_MEMORY_GIB": "80",
           "LOG_ROOT": str(tmp_path / "logs"), "FORCE_NODELIST_PARSER": "1", "PYTHONWARNINGS": "ignore",
           "MASTER_PORT": "31000", "SKIP_CONVERT": "1",
           "EXTRA_OVERRIDES": "rollout.placement=disaggregated rollout.engine_nodes=1 rollout.max_off_policy_lag=1"}
    sbatch = str(repo / "examples" / "qwen2.5-32b" / "sbatch.sh")
    proc = subprocess.run(["bash", sbatch], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr

    from tests.test_recipes import step_lines      # (node rank, host, argv) of each node line of a step

    train, engines = ([(host, argv) for _, host, argv in step_lines(out, step)] for step in ("train", "engines"))
    assert [h for h, _ in train] == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert all("--nnodes=4" in argv for _, argv in train)
    assert engines == [("gpu005", [str(fake / "python"), "-m", "megatron_rl.rollout.remote", "node", "--rendezvous",
                                   "gpu001:31002", "--num-engines", "2", "--node-index", "0",
                                   "--engines-per-node", "2", "--gpus-per-engine", "4"])]
    assert "MRL_ENGINE_RENDEZVOUS=gpu001:31002 MRL_NUM_ENGINES=2" in out
    srun = [x for x in out.splitlines() if x.startswith("== step engines:")][0]
    assert "--nodelist=gpu005" in srun and "--nodes=1" in srun

    # GPUS_PER_NODE: a real launch on this GPU-less box would otherwise detect a CPU node (test_launch_slurm.py)
    real = subprocess.run(["bash", sbatch], env={**env, "DRY_RUN": "", "PATH": f"{fake}:{os.environ['PATH']}",
                                                 "GPUS_PER_NODE": "8"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stdout + real.stderr
    ran = [shlex.split(x[4:]) for x in real.stdout.splitlines() if x.startswith("RAN ")]
    # the engine step runs in the background: its line and the train step's may come in either order
    assert [a for a in ran if a[0] == "python"] == [["python"] + engines[0][1][1:]]
    assert [a for a in ran if a[0] == "torchrun"] == [argv for _, argv in train]


def test_engines_refuse_unauthenticated_peers_and_keep_serving(cluster, tiny_model, tmp_path):
    """A peer with the wrong secret, and one sending a bare pickle (the old protocol), are refused by a real
    engine server, which logs the peer and the reason, never unpickles, and goes on serving its client."""
    import pickle
    import socket

    from megatron_rl.rollout.remote_comm import AuthError, client_handshake, parse_address

    client, procs = cluster
    addr = parse_address(client._links[0].address, "engine 0")
    assert addr[0] == "127.0.0.1"
    sock = socket.create_connection(addr, timeout=60)
    port = sock.getsockname()[1]
    with pytest.raises(AuthError):
        client_handshake(sock, b"w" * 64)
    sock.close()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = socket.create_connection(addr, timeout=60)
    data = pickle.dumps(Payload())
    raw.sendall(len(data).to_bytes(8, "big") + data + b"\0" * 64)
    try:
        while raw.recv(4096):
            pass
    except ConnectionResetError:
        pass
    raw.close()
    prompts = prompt_ids(tiny_model[1], QUESTIONS[:2])
    assert len(client.generate(prompts, step=11)) == 8          # both engines still serve the client
    log = (client.test_log_dir / "engine0.log").read_text()
    assert f"refused connection from 127.0.0.1:{port}: wrong secret" in log, log[-2000:]
    assert "bad greeting" in log and not marker.exists()
    # the secret reaches the servers through the environment, never their command line
    assert all(not any("SECRET" in a or len(a) == 64 for a in p.args) for p in procs)


def test_a_killed_engine_is_named_not_waited_for(cluster, tiny_model, original):   # keep LAST
    client, procs = cluster
    prompts = prompt_ids(tiny_model[1], QUESTIONS) * 4
    # stopped first, so the request is in flight whatever the machine's speed (a fast engine could
    # otherwise answer before the kill), then killed: the server and its vLLM engine core
    os.killpg(procs[1].pid, signal.SIGSTOP)
    handle = client.submit(prompts, step=9)
    os.killpg(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"(?s)rollout engine 1 of 2 .*control connection closed") as err:
        handle.result()
    assert err.value.engine_rank == 1 and err.value.fatal and time.monotonic() - t0 < 60
    assert "its process exited with code -9" in str(err.value)
    with pytest.raises(EngineError, match="unusable after an earlier failure"):
        client.generate(prompts[:1])
    # the weight path names it too, and releases engine 0 before any collective (white-box: forget the
    # earlier failure to reach that path)
    client._broken = None
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="rollout engine 1 of 2") as err:
        client.update_weights(original.items())
    assert err.value.engine_rank == 1 and time.monotonic() - t0 < 60
    assert procs[0].poll() is None                           # engine 0 is alive and answers
    client._links[0].send({"type": "ping", "id": "p"}, "ping")
    client._links[0].wait("p", 60, "ping")
