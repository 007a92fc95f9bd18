"""The RLVR actor-learner loop and its data side (prompt data sets, advantages).

Nothing imports the trainer; it imports every layer below it. Submodules are imported explicitly
(`megatron_rl.trainer.data`, `.advantages`) so importing the package pulls in neither vLLM nor
megatron.core.
"""
