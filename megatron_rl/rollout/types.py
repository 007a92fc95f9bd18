"""The rollout batch: what the inference engine hands to rewards, advantages and the learner.

One `Sample` per generated response. Per response token t it carries mu's log-prob of the sampled
token (`rollout_logprobs[t]`, the temperature-processed distribution, algorithms.md section 1) and, when
top-K was requested, mu's K most probable ids and their log-probs in rank order (`topk_ids[t]`,
`topk_logprobs[t]`, shape [T, K]). The sampled token is NOT appended to the top-K rows: the divergence
code adds it to the bucket set itself (algorithms.md section 3), which keeps the shape fixed.

Torch tensors, CPU, so the learner can pack them without conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass
class Sample:
    prompt_ids: torch.Tensor                 # [P] int64
    response_ids: torch.Tensor               # [T] int64, the stop token included when one was sampled
    rollout_logprobs: torch.Tensor           # [T] float32, mu(a_t | s_t) after temperature
    finish_reason: str                       # vLLM's: "stop" (a stop token), "length", "abort"
    prompt_index: int                        # the dataset's stable id of the prompt (seeds derive from it)
    group_id: int                            # samples of one prompt in one step share it (GRPO group)
    sample_index: int                        # 0..n-1 inside the group
    topk_ids: Optional[torch.Tensor] = None        # [T, K] int64, mu's top-K in rank order
    topk_logprobs: Optional[torch.Tensor] = None   # [T, K] float32
    response_text: str = ""
    reward: Optional[float] = None
    info: dict[str, Any] = field(default_factory=dict)   # e.g. the answer, data-set fields

    def __post_init__(self):
        t = int(self.response_ids.numel())
        if self.rollout_logprobs.shape != (t,):
            raise ValueError(f"rollout_logprobs has shape {tuple(self.rollout_logprobs.shape)}, "
                             f"expected ({t},) to match response_ids")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs must be given together")
        if self.topk_ids is not None:
            if self.topk_ids.dim() != 2 or self.topk_ids.shape[0] != t:
                raise ValueError(f"topk_ids has shape {tuple(self.topk_ids.shape)}, expected ({t}, K)")
            if self.topk_logprobs.shape != self.topk_ids.shape:
                raise ValueError(f"topk_logprobs shape {tuple(self.topk_logprobs.shape)} differs from "
                                 f"topk_ids shape {tuple(self.topk_ids.shape)}")

    @property
    def tokens(self) -> torch.Tensor:
        """Prompt followed by response: the sequence the learner runs its forward pass on."""
        return torch.cat([self.prompt_ids, self.response_ids])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_ids.numel())


@dataclass
class Rollout:
    samples: list[Sample]
    topk: int = 0                                     # K of topk_ids / topk_logprobs (0: not requested)
    temperature: float = 1.0                          # the temperature mu was processed with
    stats: dict[str, float] = field(default_factory=dict)   # counts and timings for the logs

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def group_ids(self) -> torch.Tensor:
        return torch.tensor([s.group_id for s in self.samples], dtype=torch.int64)

    @property
    def rewards(self) -> torch.Tensor:
        missing = [i for i, s in enumerate(self.samples) if s.reward is None]
        if missing:
            raise ValueError(f"{len(missing)} samples have no reward yet (first: sample {missing[0]}); "
                             "score the rollout before asking for rewards")
        return torch.tensor([float(s.reward) for s in self.samples], dtype=torch.float32)

    def set_rewards(self, rewards: Sequence[float]) -> None:
        if len(rewards) != len(self.samples):
            raise ValueError(f"got {len(rewards)} rewards for {len(self.samples)} samples")
        for s, r in zip(self.samples, rewards):
            s.reward = float(r)

    def select(self, keep: Sequence[bool] | torch.Tensor) -> "Rollout":
        """The samples where `keep` is true (e.g. after dropping constant-reward groups)."""
        keep = [bool(k) for k in keep]
        if len(keep) != len(self.samples):
            raise ValueError(f"keep mask has {len(keep)} entries for {len(self.samples)} samples")
        return Rollout([s for s, k in zip(self.samples, keep) if k], self.topk, self.temperature,
                       dict(self.stats))

    def padded(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded batch tensors, one row per sample, aligned on token positions.

        tokens [B, L]; response_mask [B, L] (1 at response tokens); rollout_logprobs [B, L] (mu of the
        token AT that position, 0 elsewhere; the learner's logits at position i-1 predict it);
        prompt_lengths, response_lengths [B]; with top-K also topk_ids / topk_logprobs [B, L, K]
        (ids 0 and log-prob -inf outside the response).
        """
        b = len(self.samples)
        length = max((int(s.tokens.numel()) for s in self.samples), default=0)
        out = {
            "tokens": torch.full((b, length), pad_id, dtype=torch.int64),
            "response_mask": torch.zeros((b, length), dtype=torch.float32),
            "rollout_logprobs": torch.zeros((b, length), dtype=torch.float32),
            "prompt_lengths": torch.tensor([s.prompt_ids.numel() for s in self.samples], dtype=torch.int64),
            "response_lengths": torch.tensor([s.num_response_tokens for s in self.samples], dtype=torch.int64),
        }
        if self.topk:
            out["topk_ids"] = torch.zeros((b, length, self.topk), dtype=torch.int64)
            out["topk_logprobs"] = torch.full((b, length, self.topk), float("-inf"), dtype=torch.float32)
        for i, s in enumerate(self.samples):
            p, t = int(s.prompt_ids.numel()), s.num_response_tokens
            out["tokens"][i, : p + t] = s.tokens
            out["response_mask"][i, p: p + t] = 1.0
            out["rollout_logprobs"][i, p: p + t] = s.rollout_logprobs
            if self.topk:
                out["topk_ids"][i, p: p + t] = s.topk_ids
                out["topk_logprobs"][i, p: p + t] = s.topk_logprobs
        return out
