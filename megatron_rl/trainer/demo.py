"""The embedded default job's starting point: a verifiable task and a tiny policy that is sometimes right.

Real RLVR starts from a base model that already solves some prompts; a random tiny model solves none and
RL would have no signal. So `prepare_demo` builds, offline:
  1. a synthetic verifiable task: "What is a + b?" with small integers (JSONL, prompt / answer fields);
  2. a byte-level BPE tokenizer trained on that task's text, with a chat template;
  3. a tiny Llama-family model, given a short supervised warm-up on part of the task (loss on the answer
     tokens only) and stopped early, while its sampled accuracy is still well below 1.
Everything is plain torch + transformers; the RL job then converts the model with the conversion tool.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DemoSpec:
    max_operand: int = 15          # a, b in [0, max_operand]: 256 distinct problems
    n_train: int = 2000            # RL prompts
    n_eval: int = 128
    sft_examples: int = 600        # the warm-up sees these (a subset of all sums)
    sft_steps: int = 350           # ~20% sampled accuracy (measured; see docs/demo.md)
    sft_lr: float = 3e-3
    sft_batch: int = 32
    hidden_size: int = 128
    num_layers: int = 2
    tie_word_embeddings: bool = False
    seed: int = 0


def arithmetic_examples(n: int, max_operand: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _encode(tok, prompt: str, answer: str | None = None):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if answer is None:
        return ids
    return ids, tok.encode(answer) + [tok.eos_token_id]


def sft_warmup(model, tok, rows: list[dict], steps: int, lr: float, batch: int, seed: int) -> list[float]:
    """Teacher-forced next-token loss on the answer tokens (prompt masked); returns the loss curve."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id
    encoded = [_encode(tok, r["prompt"], r["answer"]) for r in rows]  # tokenise once, not per step
    losses = []
    model.train()
    for _ in range(steps):
        seqs = rng.sample(encoded, min(batch, len(encoded)))
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), pad)
        labels = torch.full((len(seqs), width), -100)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, a) in enumerate(seqs):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
            attn[i, : len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sampled_accuracy(model, tok, rows: list[dict], samples: int = 4, temperature: float = 1.0,
                     max_new_tokens: int = 6, seed: int = 0) -> float:
    """Fraction of sampled responses whose text equals the answer (the RL reward on this task)."""
    torch.manual_seed(seed)
    correct = total = 0
    for r in rows:
        ids = torch.tensor([_encode(tok, r["prompt"])]).repeat(samples, 1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for seq in out[:, ids.shape[1]:]:
            text = tok.decode(seq, skip_special_tokens=True).strip()
            correct += text == r["answer"]
            total += 1
    return correct / max(total, 1)


def prepare_demo(out_dir: str | Path, spec: DemoSpec = DemoSpec(), log=print) -> dict:
    """Build task, tokenizer and warmed-up HF model under out_dir (skipped if already complete)."""
    from megatron_rl.utils.tiny import make_tiny_hf_model, make_tiny_tokenizer

    out = Path(out_dir)
    done = out / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    all_rows = arithmetic_examples(spec.n_train + spec.n_eval + spec.sft_examples, spec.max_operand, spec.seed)
    train, evals = all_rows[: spec.n_train], all_rows[spec.n_train: spec.n_train + spec.n_eval]
    sft_rows = all_rows[spec.n_train + spec.n_eval:]
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "eval.jsonl", evals)
    corpus = [f"{r['prompt']} {r['answer']}" for r in all_rows]
    tok = make_tiny_tokenizer(out / "tokenizer", corpus=corpus)
    torch.manual_seed(spec.seed)
    model = make_tiny_hf_model("llama", out / "hf_init", vocab_size=len(tok), tokenizer=tok,
                               hidden_size=spec.hidden_size, num_layers=spec.num_layers, seed=spec.seed,
                               tie_word_embeddings=spec.tie_word_embeddings)
    curve = sft_warmup(model, tok, sft_rows, spec.sft_steps, spec.sft_lr, spec.sft_batch, spec.seed)
    acc = sampled_accuracy(model, tok, evals[:32], seed=spec.seed)
    model.save_pretrained(out / "hf_sft")
    tok.save_pretrained(out / "hf_sft")
    info = {"hf_path": str(out / "hf_sft"), "train_path": str(out / "data" / "train.jsonl"),
            "eval_path": str(out / "data" / "eval.jsonl"), "sft_final_loss": curve[-1],
            "sft_sampled_accuracy": acc, "seconds": round(time.time() - t0, 1)}
    log(f"demo prepared in {info['seconds']}s: SFT loss {curve[0]:.2f} -> {curve[-1]:.2f}, "
        f"sampled accuracy {acc:.2f}")
    done.write_text(json.dumps(info, indent=1))
    return info
