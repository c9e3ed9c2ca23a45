"""Run distrib_gpt.train under torchrun, but make rank 1 fail at its 2nd optimizer step.

Used by tests/test_distributed.py to check that one failing rank brings the whole job down
quickly with that rank's message, while rank 0 waits in a collective.
"""

import os
import sys

from distrib_gpt import train as T

original = T.train_step
calls = 0


def failing_step(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 2:
        raise RuntimeError("injected failure on rank 1 at step 2")
    return original(*args, **kwargs)


T.train_step = failing_step
sys.exit(T.main())
