"""Run distrib_gpt.train, but SIGKILL one rank just before optimizer step KILL_AT_STEP.

Only on the first attempt (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset), so a job
under `torchrun --max-restarts=1` is killed once and then resumes by itself. Environment:
KILL_AT_STEP (1-based step number), KILL_RANK (default 1).
"""

import os
import signal
import sys

from distrib_gpt import train as T

original = T.train_step
calls = 0
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
kill_rank = os.environ.get("KILL_RANK", "1")


def train_step(*args, **kwargs):
    global calls
    calls += 1
    if first_attempt and os.environ.get("RANK", "0") == kill_rank and calls == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


T.train_step = train_step
sys.exit(T.main())
