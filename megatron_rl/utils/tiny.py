"""Tiny models and tokenizers built offline, for tests and the CPU default job.

Nothing here downloads: the tokenizer is a byte-level BPE trained with `tokenizers` on a corpus we pass
in, the models are randomly initialised transformers models of each supported family. vLLM's CPU
attention needs head_dim >= 32, hence the defaults (hidden 128, 4 heads).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def arithmetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Lines like 'What is 12 + 7? Answer: 19' covering the digits, operators and words of the task."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}? Answer: {val}")
    return lines


def make_tiny_tokenizer(out_dir: str | Path, corpus: Optional[Iterable[str]] = None, vocab_size: int = 320):
    """Train a byte-level BPE tokenizer offline and save it as a transformers fast tokenizer.

    Returns the loaded `PreTrainedTokenizerFast` (with a chat template, eos = <|end|>, pad = <|pad|>).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(corpus) if corpus is not None else arithmetic_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_hf_config(family: str, vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
                   tie_word_embeddings: bool = False, max_position_embeddings: int = 512,
                   rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None,
                   eos_token_id: int = 0, pad_token_id: int = 0, attention_bias: Optional[bool] = None):
    """A transformers config of `family` (llama | qwen2 | qwen3 | mistral) with tiny sizes.

    Family traits follow the real models: qwen2 has QKV bias, qwen3 has QK-norm and an explicit
    head_dim, mistral has no sliding window here (the dense layout we support).
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    rope = {"rope_theta": rope_theta, "rope_type": "default"}
    if rope_scaling:
        rope = {**rope, **rope_scaling}
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie_word_embeddings, rope_parameters=rope, rms_norm_eps=1e-6,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)
    if family == "llama":
        return LlamaConfig(**common, attention_bias=bool(attention_bias), head_dim=hidden_size // num_heads)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=hidden_size // num_heads)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // num_heads, attention_bias=bool(attention_bias))
    raise ValueError(f"family {family!r} is not supported; supported: llama, mistral, qwen2, qwen3")


# Tiny offline stand-ins for the small models users start from, all with tied embeddings (the real ones
# are): family + make_tiny_hf_model kwargs. head_dim 32 (vLLM's CPU attention needs >= 32).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}     # short, so the scaling changes every band
SMALL_FAMILIES = {
    "llama3.2": ("llama", dict(tie_word_embeddings=True, num_heads=4, num_kv_heads=2, rope_scaling=LLAMA3_ROPE,
                              rope_theta=500000.0)),                    # Llama 3.2 1B/3B: GQA, llama3 RoPE
    "qwen2.5": ("qwen2", dict(tie_word_embeddings=True, num_heads=4, num_kv_heads=2,
                             rope_theta=1000000.0)),                    # Qwen2.5 0.5B-3B: QKV bias
    "qwen3": ("qwen3", dict(tie_word_embeddings=True, num_heads=4, num_kv_heads=2,
                           rope_theta=1000000.0)),                      # Qwen3 0.6B-4B: QK-norm
}


def make_tiny_hf_model(family: str, out_dir: str | Path, vocab_size: int, seed: int = 0,
                       dtype: str = "float32", tokenizer=None, **config_kwargs):
    """Build a randomly initialised tiny causal LM of `family`, save it (safetensors) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if tokenizer is not None:
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = tiny_hf_config(family, vocab_size, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init leaves norms at 1 and biases at 0: perturb them so conversion tests see every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model


def make_small_family(out_dir: str | Path, name: str, seed: int = 0) -> Path:
    """A tokenizer and a tiny model of SMALL_FAMILIES[name] saved together in out_dir / name."""
    family, kwargs = SMALL_FAMILIES[name]
    path = Path(out_dir) / name
    tok = make_tiny_tokenizer(path)
    make_tiny_hf_model(family, path, vocab_size=len(tok), tokenizer=tok, seed=seed, **kwargs)
    return path
