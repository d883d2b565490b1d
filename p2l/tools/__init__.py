"""Command-line tools around runs: sweeps (`sweep`), tables over runs (`tables`), and weights
from the original PyTorch code (`convert_torch`). Each is run as `python -m p2l.tools.<name>`."""
