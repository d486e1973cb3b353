"""Device partitioning: the global device list split into instances of `tp` devices, one 1-D mesh each.

Single process: instance i gets devices [i*tp, (i+1)*tp) of `jax.devices()` (consecutive devices are
the closest ones on a GPU host). Several processes (multi-controller): every instance takes
tp / num_processes devices from each process, so each instance spans all processes. That keeps every
process running every instance's step in the same order, and the sampled tokens, replicated over the
instance's mesh, are readable on every process without an extra gather (the price is tensor-parallel
collectives across hosts; host-local instances need a token gather to the controller, which is not
built yet).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.rules import TP


def split_devices(num_instances: int, tp: int, devices: Optional[Sequence[jax.Device]] = None) -> list[list[jax.Device]]:
    devices = list(devices if devices is not None else jax.devices())
    need = num_instances * tp
    if num_instances < 1 or tp < 1:
        raise ValueError(f"num_instances and tp must be >= 1, got {num_instances} and {tp}")
    if need > len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} before jax is "
                    f"imported (the launcher's --cpu_devices={need} does it)")
        raise ValueError(f"num_instances={num_instances} x tp={tp} needs {need} devices, "
                         f"only {len(devices)} available{hint}")
    procs = sorted({d.process_index for d in devices})
    if len(procs) == 1:
        return [devices[i * tp:(i + 1) * tp] for i in range(num_instances)]
    per_proc = {p: [d for d in devices if d.process_index == p] for p in procs}
    if tp % len(procs):
        raise ValueError(f"with {len(procs)} processes every instance spans all processes, so tp={tp} "
                         f"must be a multiple of {len(procs)}")
    k = tp // len(procs)
    if any(len(v) < num_instances * k for v in per_proc.values()):
        raise ValueError(f"each process needs {num_instances * k} devices for num_instances={num_instances}, "
                         f"tp={tp}")
    return [[d for p in procs for d in per_proc[p][i * k:(i + 1) * k]] for i in range(num_instances)]


def instance_meshes(num_instances: int, tp: int,
                    devices: Optional[Sequence[jax.Device]] = None) -> list[Mesh]:
    return [Mesh(np.array(group), (TP,)) for group in split_devices(num_instances, tp, devices)]
