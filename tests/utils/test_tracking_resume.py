"""After a resume the run's JSONL logs hold each step once: the rows past the checkpoint are dropped,
atomically, from the files the real Tracker (metrics.jsonl) and Rollouts (rollouts.jsonl) write."""

import json

from megatron_rl.utils.tracking import Tracker, TrackingConfig, truncate_jsonl


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    cfg = TrackingConfig(tensorboard=False, progress=False, plot=False)
    first = Tracker(tmp_path, 5, cfg)
    for step in range(3):                      # steps 0-2 logged; the checkpoint holds step 2 (after 0, 1)
        first.log(step, {"reward/mean": 0.5})
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:              # killed mid-write: a torn last line
        f.write('{"step": 3, "rew')
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps({"step": s, "prompt_indices": [s]}) + "\n" for s in range(3)))

    assert truncate_jsonl(metrics, before_step=2) == 2      # step 2 and the torn line
    assert truncate_jsonl(rollouts, before_step=2) == 1
    assert truncate_jsonl(tmp_path / "absent.jsonl", before_step=0) == 0
    assert not list(tmp_path.glob(".*.tmp"))                 # renamed into place, nothing left beside it

    resumed = Tracker(tmp_path, 5, cfg)        # the resumed process appends from step 2 on
    for step in range(2, 5):
        resumed.log(step, {"reward/mean": 0.5})
    resumed.close()
    assert _steps(metrics) == [0, 1, 2, 3, 4]
    assert _steps(rollouts) == [0, 1]
    assert truncate_jsonl(metrics, before_step=5) == 0       # nothing past the checkpoint: file untouched


def test_truncation_is_atomic(tmp_path, monkeypatch):
    """A crash before the rename leaves the old file whole."""
    import os

    import pytest

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
    before = path.read_text()

    def crash(src, dst):
        raise OSError("killed")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        truncate_jsonl(path, before_step=1)
    assert path.read_text() == before
