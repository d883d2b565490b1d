"""The PyTorch reference network of ../shared/bench, for the equivalence tests.

Skips the calling test when torch or the reference file is absent (a user's clone).
"""

import importlib.util
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_torch.py"


def reference_network(patch: int):
    """(torch, reference module, eval-mode Patch2LocNet) with realistic BatchNorm statistics.

    BN scales and shifts are random and the running statistics are the plain average
    (momentum=None) of three random batches of `patch`-sized inputs: outputs stay O(1) and the
    statistics are far from the 0/1 init, so a converter that ignored them would be caught.
    """
    torch = pytest.importorskip("torch")
    if not REFERENCE.is_file():
        pytest.skip("../shared/bench/reference_torch.py is absent: reference test skipped")
    spec = importlib.util.spec_from_file_location("p2l_reference_torch", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    net = module.Patch2LocNet()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
        net.train()
        for _ in range(3):
            net(torch.randn(64, 1, patch, patch, generator=gen), 99 * torch.rand(64, generator=gen))
    net.eval()
    return torch, module, net
