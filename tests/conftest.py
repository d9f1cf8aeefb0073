import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch

# The suite's models are tiny: one intra-op thread is faster than two on a shared
# 2-core machine, and it keeps results independent of the machine's core count.
torch.set_num_threads(1)
