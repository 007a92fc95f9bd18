"""Prompt data sets for RLVR: JSONL or Parquet rows -> chat-templated prompt token ids + answers.

`DataConfig` is the job config's `data` section (trainer/config.py). `PromptDataset` reads and tokenizes
once (bad rows and over-long prompts are skipped and counted, or a bad row stops the load with its file
and line); `PromptLoader` serves batches in a deterministic order that depends only on (seed, epoch), and
its `state_dict()` (epoch, position) makes it resume exactly.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

FORMATS = ("auto", "jsonl", "parquet")
ON_BAD = ("error", "skip")
_MISSING = object()
log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The `data` section of the job config. Errors name the key; the config loader prefixes the section
    (`config section `data`: ...`), and the checks that run after loading write that prefix themselves."""

    train_path: str = ""                    # JSONL or Parquet
    prompt_key: str = "prompt"              # dotted for nested fields ("extra.question"); a string, or a
                                            # list of chat messages [{"role", "content"}]
    answer_key: Optional[str] = "answer"    # None when the reward needs no answer
    format: Literal["auto", "jsonl", "parquet"] = "auto"   # auto: by extension (.jsonl / .json / .parquet)
    # error: a bad row stops the load naming file:line; skip: skip and count. A prompt over the token limit
    # is skipped in both (counted, warned with its file:line)
    on_bad_line: Literal["error", "skip"] = "error"
    apply_chat_template: bool = True        # the tokenizer's chat template, generation prompt added
    system_prompt: Optional[str] = None     # prepended as a system message when templating
    keep_keys: tuple[str, ...] = ()         # other fields copied into PromptRecord.info
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"`{key}` {why}")

        if not self.train_path:
            bad("train_path", "must name a JSONL or Parquet file")
        if self.format not in FORMATS:
            bad("format", f"is {self.format!r}; allowed: {', '.join(FORMATS)}")
        if self.on_bad_line not in ON_BAD:
            bad("on_bad_line", f"is {self.on_bad_line!r}; allowed: {', '.join(ON_BAD)}")
        if not self.prompt_key:
            bad("prompt_key", "must be a field name")
        if self.system_prompt is not None and not self.apply_chat_template:
            bad("system_prompt", "needs apply_chat_template=True")

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = Path(self.train_path).suffix.lower()
        if suffix in (".jsonl", ".json"):
            return "jsonl"
        if suffix == ".parquet":
            return "parquet"
        raise ValueError(f"config section `data`: `format` is auto but `train_path` {self.train_path!r} has no "
                         ".jsonl/.json/.parquet extension; set format")

    def check_readable(self) -> None:
        """The file exists and its format is known: the job's start-up check (RLConfig.check_startup), and
        PromptDataset's before it reads, for callers that load a data set on its own."""
        if not Path(self.train_path).is_file():
            raise FileNotFoundError(f"config section `data`: `train_path` {self.train_path!r} is not a file")
        self.resolved_format()


@dataclass
class PromptRecord:
    index: int                      # row number in the file (0-based, blank lines included): a stable id
    prompt_ids: list[int]
    prompt_text: str
    answer: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class BadRecord(ValueError):
    pass


def _get(row: Any, dotted: str) -> Any:
    cur = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _read_jsonl(path: str) -> Iterator[tuple[int, str, Any]]:
    """(row index, location for errors, parsed row or a BadRecord)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno - 1, where, BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                row = BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield lineno - 1, where, row


def _read_parquet(path: str, cfg: DataConfig) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    for key in (cfg.prompt_key, cfg.answer_key):
        if key and key.split(".")[0] not in columns:
            raise ValueError(f"{path}: no column {key.split('.')[0]!r} (for field {key!r}); columns: {columns}")
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield index, f"{path}: row {index}", row
            index += 1


def _messages(prompt: Any, cfg: DataConfig, where: str) -> list[dict]:
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise BadRecord(f"{where}: prompt field {cfg.prompt_key!r} must be a string or a list of "
                        "{'role', 'content'} messages")
    if cfg.system_prompt is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": cfg.system_prompt}] + msgs
    return msgs


class PromptDataset:
    """All usable prompts of one file, tokenized. `stats` counts what was read and skipped.
    max_prompt_tokens: longer prompts are skipped and counted (the job: rollout.max_prompt_length)."""

    def __init__(self, config: DataConfig, tokenizer, max_prompt_tokens: int = 1024):
        if max_prompt_tokens < 1:
            raise ValueError(f"PromptDataset: `max_prompt_tokens` must be >= 1, got {max_prompt_tokens}")
        self.config, self.max_prompt_tokens = config, max_prompt_tokens
        self.records: list[PromptRecord] = []
        self.stats = {"rows": 0, "bad_records_skipped": 0, "too_long_skipped": 0, "kept": 0}
        self.too_long_where: list[str] = []     # the first few skipped over-long prompts' file:line
        self._load(tokenizer)

    def _row_to_text(self, row: Any, where: str, tokenizer) -> tuple[str, Any, dict]:
        cfg = self.config
        if isinstance(row, BadRecord):
            raise row
        prompt = _get(row, cfg.prompt_key)
        if prompt is _MISSING or prompt is None:
            raise BadRecord(f"{where}: no prompt field {cfg.prompt_key!r} (fields: {sorted(row)})")
        answer = None
        if cfg.answer_key:
            answer = _get(row, cfg.answer_key)
            if answer is _MISSING or answer is None:
                raise BadRecord(f"{where}: no answer field {cfg.answer_key!r} (fields: {sorted(row)})")
        if cfg.apply_chat_template:
            text = tokenizer.apply_chat_template(_messages(prompt, cfg, where), add_generation_prompt=True,
                                                 tokenize=False)
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise BadRecord(f"{where}: prompt field {cfg.prompt_key!r} must be a string without a chat template")
        info = {k: v for k in cfg.keep_keys if (v := _get(row, k)) is not _MISSING}
        return text, answer, info

    def _load(self, tokenizer) -> None:
        cfg = self.config
        path = str(cfg.train_path)
        cfg.check_readable()
        rows = _read_jsonl(path) if cfg.resolved_format() == "jsonl" else _read_parquet(path, cfg)
        pending: list[tuple[int, str, str, Any, dict]] = []
        for index, where, row in rows:
            self.stats["rows"] += 1
            try:
                text, answer, info = self._row_to_text(row, where, tokenizer)
            except BadRecord:
                if cfg.on_bad_line == "error":
                    raise
                self.stats["bad_records_skipped"] += 1
                continue
            pending.append((index, where, text, answer, info))
            if len(pending) >= 1024:
                self._tokenize(pending, tokenizer)
                pending = []
        self._tokenize(pending, tokenizer)
        self.stats["kept"] = len(self.records)
        if not self.records:
            raise ValueError(f"{path}: no usable prompts ({self.stats})")
        if self.stats["too_long_skipped"]:
            log.warning("%s: %s", path, self.too_long_message())

    def too_long_message(self) -> str:
        """What the skipped over-long prompts were (the load's warning, and the loop's once per epoch)."""
        n, first = self.stats["too_long_skipped"], ", ".join(self.too_long_where)
        return (f"{n} of {self.stats['rows']} prompts are longer than {self.max_prompt_tokens} tokens "
                f"(rollout.max_prompt_length) and are skipped (first: {first}); raise the limit to keep them")

    def _tokenize(self, pending, tokenizer) -> None:
        if not pending:
            return
        # a chat template writes its own special tokens (BOS included when the model uses one)
        special = not self.config.apply_chat_template
        ids = tokenizer([p[2] for p in pending], add_special_tokens=special)["input_ids"]
        for (index, where, text, answer, info), prompt_ids in zip(pending, ids):
            if len(prompt_ids) > self.max_prompt_tokens:
                # not a bad row, in either on_bad_line mode: a length filter is the common intent, and
                # failing a real data set for a few long prompts would be worse; the load's warning and
                # the per-epoch one (trainer/rollouts.py) give the count and the first rows' file:line
                self.stats["too_long_skipped"] += 1
                if len(self.too_long_where) < 5:
                    self.too_long_where.append(f"{where} ({len(prompt_ids)} tokens)")
                continue
            if not prompt_ids:
                if self.config.on_bad_line == "error":
                    raise BadRecord(f"{self.config.train_path}: row {index}: the prompt tokenizes to nothing")
                self.stats["bad_records_skipped"] += 1
                continue
            self.records.append(PromptRecord(index, list(prompt_ids), text, answer, info))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]


def epoch_order(num_records: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The visiting order of one epoch: a function of (seed, epoch) only, identical across processes
    (random.Random seeded with a string hashes it with SHA-512, not Python's salted hash)."""
    order = list(range(num_records))
    if shuffle:
        random.Random(f"megatron_rl:{seed}:{epoch}").shuffle(order)
    return order


class PromptLoader:
    """Batches of prompts in a deterministic, resumable order; epochs roll over inside a batch."""

    def __init__(self, dataset: PromptDataset, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = dataset.config.seed
        self.shuffle = dataset.config.shuffle
        self.epoch = 0
        self.position = 0          # prompts of the current epoch already served
        self._order = epoch_order(len(dataset), self.seed, 0, self.shuffle)

    def next_batch(self) -> list[PromptRecord]:
        out = []
        while len(out) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
            take = min(self.batch_size - len(out), len(self._order) - self.position)
            out += [self.dataset[i] for i in self._order[self.position: self.position + take]]
            self.position += take
        return out

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.dataset), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state_dict()` was taken. The data set and seed must be the same ones: a
        different record count or seed would silently change the order, so it is refused."""
        for key, mine in (("num_records", len(self.dataset)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"prompt loader state: `{key}` is {state.get(key)!r} in the checkpoint but "
                                 f"{mine!r} now; resuming would change the prompt order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self.dataset) or epoch < 0:
            raise ValueError(f"prompt loader state: epoch {epoch} / position {position} out of range")
        self.epoch, self.position = epoch, position
        self._order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
