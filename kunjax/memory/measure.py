"""Measured device memory: what XLA really holds, never a counter the code keeps itself.

On GPU `device.memory_stats()` reports the allocator's `bytes_in_use` and `bytes_limit`. On CPU it
is missing, so we sum the shards of `jax.live_arrays()` that live on the device, and an explicit
per-device budget (`--hbm_bytes`) stands in for HBM size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax


def live_bytes_by_device() -> dict[jax.Device, int]:
    """Per-device bytes of all live arrays. Reads shard shapes from the sharding rather than
    touching `addressable_shards[i].data`, which would create (and keep) per-shard array objects
    that then show up in `jax.live_arrays()` themselves."""
    out: dict[jax.Device, int] = {}
    for arr in jax.live_arrays():
        if arr.is_deleted():
            continue
        shard_bytes = math.prod(arr.sharding.shard_shape(arr.shape)) * arr.dtype.itemsize
        for dev in arr.sharding.addressable_devices:
            out[dev] = out.get(dev, 0) + shard_bytes
    return out


def device_live_bytes(device: jax.Device) -> int:
    return live_bytes_by_device().get(device, 0)


def device_stats(device: jax.Device) -> Optional[dict]:
    try:
        return device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None


@dataclasses.dataclass
class DeviceMemory:
    device: str
    live_bytes: int  # sum of live jax arrays on this device
    bytes_in_use: Optional[int]  # allocator view (GPU/TPU), None on CPU
    bytes_limit: Optional[int]
    peak_bytes_in_use: Optional[int]


def snapshot(devices) -> list[DeviceMemory]:
    live = live_bytes_by_device()
    out = []
    for d in devices:
        st = device_stats(d) or {}
        out.append(DeviceMemory(str(d), live.get(d, 0), st.get("bytes_in_use"), st.get("bytes_limit"),
                                st.get("peak_bytes_in_use")))
    return out


CPU_DEFAULT_BUDGET_CAP = 4 << 30


def host_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_default_budget(num_devices_in_use: int) -> Optional[int]:
    """A CPU device has no memory limit of its own; without --hbm_bytes each virtual device that
    serves gets an even share of half the host's RAM, at most 4 GiB, so `make serve` works out of
    the box and several instances on one host never promise more memory than the host has. Only
    the devices in use count: virtual devices created but left idle take nothing."""
    ram = host_memory_bytes()
    if not ram:
        return None
    return int(min(CPU_DEFAULT_BUDGET_CAP, ram // 2 // max(1, num_devices_in_use)))


def device_budget(device: jax.Device, hbm_bytes: Optional[int], fraction: float, cpu_share: int = 1) -> Optional[int]:
    """The memory an instance may use on `device`: the explicit budget, else a fraction of the
    allocator's limit, else (CPU) an even share of half the host RAM among the `cpu_share` devices
    in use; None when nothing is known."""
    if hbm_bytes:
        return int(hbm_bytes)
    st = device_stats(device)
    if st and st.get("bytes_limit"):
        return int(st["bytes_limit"] * fraction)
    if device.platform == "cpu":
        return cpu_default_budget(cpu_share)
    return None
