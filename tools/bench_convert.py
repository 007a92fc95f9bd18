"""Peak memory of HF -> Megatron conversion at TP=2: streaming (the library) vs whole-model-in-memory.

    python tools/bench_convert.py --work /tmp/bench_convert [--layers 8 --hidden 1024 --ffn 2816 --vocab 32000]

Writes a random Llama-shaped fp32 model (a few hundred MB, 3 safetensors shards, written tensor by tensor
so the generator itself stays small), then for each mode launches `torchrun --nproc-per-node 2` on this
file and records every rank's RSS after imports (before any conversion work) and its peak RSS
(ru_maxrss, which covers the whole process lifetime):

  streaming   megatron_rl.megatron.hf_checkpoint.hf_to_megatron (lazy per-tensor slices, own shards only)
  whole       the naive way: each rank loads the entire HF state dict (safetensors.torch.load_file),
              then fills and saves the same model with the same mapping
  export      megatron_to_hf at TP=2 of the streaming output (one full tensor at a time)

Prints a table and writes <work>/results.json. Numbers belong in docs/bench_convert.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 1 << 20


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_model(path: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv: int) -> int:
    import torch

    from megatron_rl.convert import SafetensorsWriter, hf_tensor_specs, to_model_config
    from megatron_rl.convert.safetensors_io import write_index

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
          "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False,
          "torch_dtype": "float32"}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    specs = hf_tensor_specs(to_model_config(hf, "float32"))
    files = [specs[i::3] for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    total = 0
    for i, part in enumerate(files):
        w = SafetensorsWriter(path / f"model-{i + 1:05d}-of-00003.safetensors",
                              [(n, torch.float32, s) for n, s in part])
        for n, s in part:
            w.write(n, torch.randn(s, generator=gen) * 0.02)
            total += 4 * int(torch.Size(s).numel())
        w.close()
    write_index(path, [(f"model-{i + 1:05d}-of-00003.safetensors", [(n, 4 * torch.Size(s).numel()) for n, s in part])
                       for i, part in enumerate(files)])
    return total


def worker(mode: str, src: str, dst: str, report: str) -> None:
    import torch.distributed as dist

    from megatron_rl.megatron import hf_checkpoint as hc
    import megatron.core.dist_checkpointing  # noqa: F401 - import cost is not conversion memory

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "streaming":
        hc.hf_to_megatron(src, dst, tp=2, pp=1)
    elif mode == "export":
        hc.megatron_to_hf(src, dst, tp=2, pp=1)
    elif mode == "whole":
        from megatron.core import dist_checkpointing
        from safetensors.torch import load_file

        from megatron_rl.convert import DictSource, HFCheckpoint, source_dtype, to_model_config
        from megatron_rl.megatron.parallel import destroy_parallel, initialize_parallel

        ck = HFCheckpoint(src)
        cfg = to_model_config(ck.config, source_dtype(ck))
        everything = {}
        for f in sorted(Path(src).glob("*.safetensors")):  # cloned: load_file's tensors may be mmap-backed
            everything.update({k: v.clone() for k, v in load_file(str(f)).items()})
        ps = initialize_parallel(tp=2, pp=1, model_cfg=cfg)
        model = hc.build(cfg, ps)
        hc.fill_from_hf(model, cfg, ps, DictSource(everything))
        if rank == 0:
            Path(dst).mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), dst)
        destroy_parallel()
    seconds = time.perf_counter() - t0
    dist.barrier()
    Path(report).with_suffix(f".rank{rank}.json").write_text(json.dumps(
        {"mode": mode, "rank": rank, "rss_after_imports_mb": rss0, "peak_rss_mb": _peak_mb(), "seconds": seconds}))
    dist.destroy_process_group()


def launch(mode: str, src: Path, dst: Path, report: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", mode, "--src", str(src), "--dst", str(dst), "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_convert")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--worker", choices=["streaming", "whole", "export"])
    p.add_argument("--src")
    p.add_argument("--dst")
    p.add_argument("--report")
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.src, a.dst, a.report)
        return 0

    work = Path(a.work)
    if work.exists():
        shutil.rmtree(work)
    model_bytes = make_model(work / "hf", a.layers, a.hidden, a.ffn, a.vocab, a.heads, a.kv_heads)
    # Largest single tensor (embedding / lm_head): the "one tensor" of the memory bound.
    largest = 4 * a.vocab * a.hidden
    results = {"model_mb": model_bytes / MB, "largest_tensor_mb": largest / MB, "tp": 2, "runs": {}}
    for mode, src, dst in (("streaming", work / "hf", work / "mcore"), ("whole", work / "hf", work / "mcore_whole"),
                           ("export", work / "mcore", work / "hf_back")):
        results["runs"][mode] = launch(mode, src, dst, work / f"{mode}.json")
    # The export must give the source back bit for bit (checked one tensor at a time).
    import torch

    from megatron_rl.convert import HFCheckpoint

    a, b = HFCheckpoint(work / "hf"), HFCheckpoint(work / "hf_back")
    assert sorted(a.names) == sorted(b.names)
    results["export_bit_identical"] = all(torch.equal(a.read(n), b.read(n)) for n in a.names)
    assert results["export_bit_identical"]
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print(f"model {results['model_mb']:.0f} MB fp32 (half: {results['model_mb'] / 2:.0f} MB), largest tensor "
          f"{results['largest_tensor_mb']:.0f} MB, TP=2, 2 ranks")
    print(f"{'mode':<10} {'rank':>4} {'RSS after imports MB':>21} {'peak RSS MB':>12} "
          f"{'peak - imports MB':>18} {'s':>6}")
    for mode, ranks in results["runs"].items():
        for r in ranks:
            print(f"{mode:<10} {r['rank']:>4} {r['rss_after_imports_mb']:>21.0f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:>18.0f} {r['seconds']:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
