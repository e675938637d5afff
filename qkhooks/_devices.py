"""Tensor operations a hook runs per layer, kept to the fewest: host-to-device copies that never stall the host (used by
every hook that moves an index or a mask), and a detach only where autograd tracks the tensor."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU by a pinned, non-blocking copy: torch's plain ``.to("cuda")``
    of pageable memory synchronises the stream, so the host waits for every kernel queued so far, once per call; a
    hook doing that in each layer stalls the model's forward (issue 20: attention rows cost +47% on a ViT-S at batch 32
    on an H200 for that alone). The copy is ordered on the current stream like any kernel, from a pinned block of our
    own, never the caller's tensor: the copy runs after the kernels queued before it, and a tensor the caller already
    pinned (``pin_memory()`` returns it as it is) could be edited in place by then; torch's pinned-memory cache keeps
    our block until the copy has run. Other devices (MPS, XPU, another GPU) take a plain ``.to``."""
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return staged.copy_(t).to(device, non_blocking=True)


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` cut from autograd's graph: ``detach`` only where ``t`` tracks grad. Under ``torch.no_grad`` (most
    recordings) nothing does, and each operation skipped is a kernel launch's host time (~5 us on a GPU) a layer."""
    return t.detach() if t.requires_grad else t
