"""Moving many small results to the host with one copy per device.

``t.cpu()`` on an accelerator waits for the device; called once per tensor it stalls the step
once per tensor. Stacking first makes it one wait per device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_host(values: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """0-dim ``values`` as CPU tensors of ``dtype``, in order, with one transfer per device."""
    out: list[Tensor | None] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    for indices in by_device.values():
        host = torch.stack([values[i].to(dtype) for i in indices]).cpu()
        for j, i in enumerate(indices):
            out[i] = host[j]
    return out  # type: ignore[return-value]
