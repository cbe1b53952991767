import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# Tests run two xdist workers on two cores: one intra-op thread each avoids oversubscription
# (which makes small elementwise ops hundreds of times slower).
torch.set_num_threads(1)
