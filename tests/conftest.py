"""Test-wide settings."""

import torch

# The tests step tiny tensors: one thread avoids OpenMP start-up and oversubscription when the
# distributed tests run their ranks beside the main process.
torch.set_num_threads(1)
