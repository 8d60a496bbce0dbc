"""Staging state in host memory for an asynchronous checkpoint (consumer/async_save.py).

A snapshot must not change while a background thread writes it, and the step loop must wait
only for the copy. On a GPU the copy goes into pinned host buffers (allocated at the first save
and reused: pinning is slow, and the shapes repeat), queued without a sync per tensor and waited
for once at the end, as torchtitan's pinned-memory staging does. On the CPU it is a clone.
"""

from __future__ import annotations

import copy

import torch


class InPlace:
    """No copy: a synchronous save writes the live tensors before training goes on."""

    def copy(self, _key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def tree(self, obj):
        """A small nested state (a state dict's hyperparameters and step counts): as it is."""
        return obj

    def synchronize(self) -> None:
        pass


class HostStaging(InPlace):
    """Copies tensors into host buffers keyed by name; `synchronize()` once after the last copy."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._pending_device = False

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return tensor.clone(memory_format=torch.contiguous_format)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=True)
        self._pending_device = True
        return buffer

    def tree(self, obj):
        """A deep copy of a small nested state, its tensors cloned where they live: the file
        written from it is the one a synchronous save writes."""
        return copy.deepcopy(obj)

    def synchronize(self) -> None:
        """Wait for the queued device-to-host copies: after it, the snapshot is the state as it
        was and training may change the originals."""
        if self._pending_device:
            torch.cuda.synchronize()
            self._pending_device = False

