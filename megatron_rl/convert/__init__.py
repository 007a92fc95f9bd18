"""HF <-> Megatron-core checkpoint conversion: mappings per family, lazy safetensors IO, layout.

torch + safetensors-format code only (no megatron.core, no transformers); megatron_rl.megatron.
hf_checkpoint builds the model and does the dist-checkpoint side.

Per-tensor API (also used by the RL weight sync to stream learner weights in HF layout):

    cfg = to_model_config(json.load(open("config.json")), dtype="bfloat16")
    for e in model_entries(cfg):                          # global Megatron names, kinds, HF names
        shard = to_megatron(cfg, e, HFCheckpoint(src), tp_rank, tp)   # reads only this rank's slices
        pairs = to_hf(cfg, e, tp_shards)                  # [(hf_name, full tensor)], padding removed
"""

from .families import (FAMILIES, check_source, entry_of, family_of, hf_tensor_specs, model_entries,
                       source_dtype, supported_architectures, to_hf_config, to_model_config)
from .hf_config import SUPPORTED_ROPE, UnsupportedModelError
from .layout import (META_FILE, WEIGHTS_DIR, check_target, export_plan, read_metadata, staging_dir,
                     weights_dir)
from .mapping import (DictSource, Entry, full_shape, global_name, hf_shape, shard_full, stage_of, to_hf,
                      to_megatron, tp_split_dim)
from .safetensors_io import CheckpointError, HFCheckpoint, SafetensorsFile, SafetensorsWriter

__all__ = ["FAMILIES", "META_FILE", "SUPPORTED_ROPE", "WEIGHTS_DIR", "CheckpointError", "DictSource", "Entry",
           "HFCheckpoint", "SafetensorsFile", "SafetensorsWriter", "UnsupportedModelError", "check_source",
           "check_target", "entry_of", "export_plan", "family_of", "full_shape", "global_name", "hf_shape",
           "hf_tensor_specs", "model_entries", "read_metadata", "shard_full", "source_dtype", "stage_of",
           "staging_dir", "supported_architectures", "to_hf", "to_hf_config", "to_megatron", "to_model_config",
           "tp_split_dim", "weights_dir"]
