"""Device operations as data: the ordered log every process of a multi-host cluster replays.

JAX's multi-controller runtime needs every process to launch the same programs in the same order.
The control plane decides on one process; each device operation it decides on (a step of a unit, a
parameter drop, a KV copy, a restore) is first written as a `DeviceOp` (a kind, a target, JSON
arguments, numpy arrays), sent to the other processes, and then executed by the same function on
every process (`Cluster.execute`). Nothing here imports JAX.

Wire format (sharding.multihost): one frame per batch of ops, a JSON header listing each op's kind,
target and args, followed by one `np.savez` archive of their arrays (keys "<op index>/<name>"; no
pickle).
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Sequence

import numpy as np

STEP = "step"


@dataclasses.dataclass
class DeviceOp:
    kind: str  # STEP, or a cluster operation registered with Cluster.register_op
    target: int  # the unit a unit op runs on; -1 for cluster operations
    args: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-able
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def encode_ops(ops: Sequence[DeviceOp]) -> tuple[bytes, bytes]:
    """(header, payload) of a batch of ops."""
    header = json.dumps({"ops": [[op.kind, op.target, op.args] for op in ops]}).encode()
    buf = io.BytesIO()
    np.savez(buf, **{f"{i}/{k}": v for i, op in enumerate(ops) for k, v in op.arrays.items()})
    return header, buf.getvalue()


def decode_ops(header: bytes, payload: bytes) -> list[DeviceOp]:
    meta = json.loads(header)["ops"]
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    ops = [DeviceOp(kind, target, args) for kind, target, args in meta]
    for key, value in arrays.items():
        i, name = key.split("/", 1)
        ops[int(i)].arrays[name] = value
    return ops
