"""HF checkpoint -> megatron-core dist-checkpoint (+ tokenizer, metadata). Thin CLI over
megatron_rl.megatron.hf_checkpoint.

    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir Llama-3.1-8B --out ckpt/llama --tp 8
    python tools/convert_hf_to_megatron.py --hf-dir tiny --out ckpt/tiny            # one process, TP1 PP1

Each rank reads only its slices and writes only its shards. The __main__ guard is required:
dist-checkpointing's save starts a spawn-context multiprocessing helper that re-imports this file.
"""

import sys

from megatron_rl.megatron.hf_checkpoint import hf_to_megatron_main

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main(sys.argv[1:]))
