"""Moving arrays between instance meshes (pipeline stages), single- and multi-controller.

In one process `jax.device_put(x, target_sharding)` copies device to device. In a multi-controller
cluster every instance mesh spans all processes (sharding.mesh) and JAX refuses a cross-host
reshard between different device sets; but two instance meshes of the same shape take the same
number of devices from every process in the same order, so shard i of the source lives on the same
process as shard i of the target. Each process then copies its own shards device to device and
assembles the target array from them (`jax.make_array_from_single_device_arrays`): no collective,
nothing compiled, the same code path on every process.

Host data goes the same way (`put`): every process holds the same numpy value (the operation log
guarantees it), so each puts its own shards on its own devices. `jax.device_put` of host data onto a
sharding that spans processes would instead check that the value is equal everywhere, which costs a
collective (and a compile per shape) on every transfer.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def move(x: jax.Array, target: NamedSharding) -> jax.Array:
    """x (on one instance mesh) onto `target` (the same spec on another mesh of the same shape)."""
    if x.is_fully_addressable and target.is_fully_addressable:
        return jax.device_put(x, target)
    src = list(x.sharding.mesh.devices.flat)
    dst = list(target.mesh.devices.flat)
    if len(src) != len(dst) or x.sharding.spec != target.spec:
        raise ValueError(f"move: source {x.sharding} and target {target} differ in mesh size or spec")
    position = {d: i for i, d in enumerate(src)}
    shards = [jax.device_put(s.data, dst[position[s.device]]) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


def move_tree(tree: Any, targets: Any) -> Any:
    """`move` over a pytree; `targets` is one sharding for all leaves or a matching pytree."""
    if isinstance(targets, NamedSharding):
        return jax.tree.map(lambda a: move(a, targets), tree)
    return jax.tree.map(move, tree, targets)


def put(x, target: NamedSharding) -> jax.Array:
    """Host data (numpy, the same on every process) onto `target`."""
    if target.is_fully_addressable:
        return jax.device_put(x, target)
    x = np.asarray(x)
    shards = [jax.device_put(x[index], d) for d, index in target.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


def put_tree(tree: Any, targets: Any) -> Any:
    """`put` over a pytree; `targets` is one sharding for all leaves or a matching pytree."""
    if isinstance(targets, NamedSharding):
        return jax.tree.map(lambda a: put(a, targets), tree)
    return jax.tree.map(put, tree, targets)
