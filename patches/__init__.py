"""Runtime patches for upstream packages (installed as megatron_rl.patches).

Each module says what it fixes, why, for which upstream versions, and when to drop it.
"""
