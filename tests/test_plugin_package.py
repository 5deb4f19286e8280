"""The example third-party plugin (examples/sign_sgd_plugin) installed as a package of its own:
its entry point is discovered, ``rule=None`` picks it, and it matches its dense optimizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "sign_sgd_plugin"

SCRIPT = r"""
import json
import torch
import lowrank_opt as lo
from lowrank_signum import LoFTSignum, Signum

r = 6
gen = torch.Generator().manual_seed(3)
a = torch.nn.Parameter(torch.randn(r, r, generator=gen, dtype=torch.float64) / r**0.5)
b = torch.nn.Parameter(torch.randn(r, r, generator=gen, dtype=torch.float64) / r**0.5)
pair = lo.LoRAPair(a, b, 2.0)
target = torch.randn(r, r, generator=gen, dtype=torch.float64)
loss = lambda w: 0.5 * (w - target).pow(2).sum() + 0.1 * (w**3).sum() / w.numel()
w = torch.nn.Parameter((pair.scale * b @ a).detach().clone())
opt = lo.LowRankWrapper(Signum([a, b], lr=1e-2, weight_decay=0.1), [pair])
dense = Signum([w], lr=1e-2, weight_decay=0.1)
error = 0.0
for _ in range(50):
    for o, weight in ((opt, pair.scale * b @ a), (dense, w)):
        o.zero_grad()
        loss(weight).backward()
        o.step()
    error = max(error, ((pair.scale * b @ a - w).norm() / w.norm()).item())
print(json.dumps({
    "rules": sorted(lo.available_rules()),
    "picked": type(opt.rule).__name__,
    "is_registered_class": lo.available_rules()["loft_signum"] is LoFTSignum,
    "error": error,
}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed (without dependencies) into a fresh directory, built from a copy so
    the source tree stays clean."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PACKAGE, root / "src")
    target = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_installed_plugin_is_discovered_and_matches_its_dense_optimizer(site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "loft_signum" in result["rules"] and {"loft_adamw", "loft_adafactor", "loft_muon", "generic"} <= set(
        result["rules"]
    )
    assert result["picked"] == "LoFTSignum" and result["is_registered_class"]
    assert result["error"] < 1e-9


def test_plugin_is_absent_without_the_package():
    """Discovery comes from the installed distribution, not from the example's source tree."""
    import lowrank_opt as lo

    assert "loft_signum" not in lo.available_rules()
