"""checkpoint.on_damaged: "error" (default) or "previous"; anything else is refused naming the key."""

import pytest

from megatron_rl.trainer.config import CheckpointSection


def test_on_damaged_values():
    assert CheckpointSection().on_damaged == "error"
    assert CheckpointSection(on_damaged="previous").on_damaged == "previous"
    with pytest.raises(ValueError, match="checkpoint.on_damaged"):
        CheckpointSection(on_damaged="skip")
