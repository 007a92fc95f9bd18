"""Converted / trained megatron_rl checkpoint -> HF safetensors (sharded, with index), config.json,
generation_config.json and tokenizer files that transformers loads directly. Thin CLI over
megatron_rl.megatron.hf_checkpoint.

    torchrun --nproc-per-node 8 tools/convert_megatron_to_hf.py --ckpt-dir ckpt/llama --out hf/llama --tp 8
    python tools/convert_megatron_to_hf.py --ckpt-dir ckpt/tiny --out hf/tiny        # one process

The __main__ guard is required (dist-checkpointing starts a spawn-context multiprocessing helper).
"""

import sys

from megatron_rl.megatron.hf_checkpoint import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main(sys.argv[1:]))
