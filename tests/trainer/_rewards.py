"""Rewards for end-to-end tests of untrained models (`reward.fn: tests.trainer._rewards:length`): an
untrained model never answers a sum, so exact match scores 0 everywhere, every GRPO advantage is 0 and
nothing trains. A reward that varies with the response gives the loss a signal to act on."""


def length(response: str, answer) -> float:
    return (len(response) % 5) / 4
