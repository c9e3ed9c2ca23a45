"""Run distrib_gpt.train under torchrun with an int8 conversion that takes SLOW_QUANTIZE_S
seconds longer than usual, as a large model's would.

Used by tests/test_distributed.py: the conversion must not be bounded by the collective
timeout (parallel.timeout_s), i.e. no other rank may be waiting for rank 0 while it runs.
"""

import os
import sys
import time

from distrib_gpt import quantize as Q
from distrib_gpt import train as T

original = Q.quantize_after_training


def slow_quantize(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_QUANTIZE_S"]))
    return original(*args, **kwargs)


Q.quantize_after_training = slow_quantize
sys.exit(T.main())
