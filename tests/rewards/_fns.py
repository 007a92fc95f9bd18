"""Reward functions for the reward-worker tests, importable by name as the worker needs."""

import os
import subprocess
import sys
import time


def hang_on(response, answer):
    """Hangs forever on the response "hang", else scores 1."""
    if response == "hang":
        while True:
            time.sleep(3600)
    return 1.0


def crash_on(response, answer):
    """Kills its own process on "crash" (a segfaulting verifier), else scores 1."""
    if response == "crash":
        os._exit(3)
    return 1.0


def spawn_and_hang(response, answer):
    """Starts a grandchild (a sandbox), writes its pid to the file `answer`, and hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(answer, "w") as f:
        f.write(str(child.pid))
    while True:
        time.sleep(3600)


def const(response, answer):
    return 1.0
