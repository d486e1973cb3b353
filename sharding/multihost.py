"""Multi-controller serving: process 0 decides, every process executes the same programs in order.

JAX's multi-controller runtime requires every process to launch the same jitted programs in the
same order. The control plane (gRPC front, scheduler, dispatcher) runs only on process 0; every
device operation it decides on (the steps of an iteration, a parameter drop, a KV copy, a restore:
kunjax.control.ops.DeviceOp) is sent over a small TCP side channel to the followers before process
0 runs it, and the followers replay the log in order through the same `Cluster.execute`. Instances
span all processes (sharding.mesh), so each step is one SPMD program across hosts and its sampled
tokens, replicated over the instance mesh, are readable on process 0 without a further gather.

Wire format: length-prefixed frames; a frame is a JSON header (kunjax.control.ops.encode_ops) and one
`np.savez` archive of the ops' arrays (no pickle); a header {"stop": true} ends the log.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from typing import Optional, Sequence

from kunjax.control.ops import STEP, DeviceOp, decode_ops, encode_ops

log = logging.getLogger(__name__)

_LEN = struct.Struct("!Q")


def initialize(coordinator_address: str, num_processes: int, process_id: int, cpu_collectives: str = "gloo") -> None:
    import jax

    # Only affects the CPU backend (collectives across processes); must precede backend start-up.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    # jax.distributed.initialize otherwise starts JAX's preemption sync manager, whose notifier
    # installs its own SIGTERM handler: it logs "SIGTERM caught" and swallows the signal (it only
    # marks a sync point for multihost_utils.reached_preemption_sync_point, which kunjax never
    # polls), so a SIGTERM during loading or warm-up was ignored. The launcher handles SIGTERM itself
    # (serving.launch: prompt exit during start-up, graceful drain while serving).
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d/%d up: %d global devices, %d local", jax.process_index(), jax.process_count(),
             jax.device_count(), jax.local_device_count())


def default_control_port(coordinator_address: str) -> int:
    return int(coordinator_address.rsplit(":", 1)[1]) + 1


def _send_frame(sock: socket.socket, header: bytes, payload: bytes = b"") -> None:
    sock.sendall(_LEN.pack(len(header)) + header + _LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control channel closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])
    payload = _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])
    return header, payload


_STOP = json.dumps({"stop": True}).encode()


class ControllerChannel:
    """Process 0's end: the OpLog of kunjax.control.cluster.Cluster."""

    def __init__(self, port: int, num_followers: int, host: str = ""):
        self.num_followers = num_followers
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._socks: list[socket.socket] = []

    def accept(self, timeout: float = 600.0) -> None:
        self._listener.settimeout(timeout)
        while len(self._socks) < self.num_followers:
            s, addr = self._listener.accept()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks.append(s)
            log.info("follower connected from %s", addr)

    def send(self, ops: Sequence[DeviceOp]) -> None:
        header, payload = encode_ops(ops)
        for s in self._socks:
            _send_frame(s, header, payload)

    def close(self) -> None:
        for s in self._socks:
            try:
                _send_frame(s, _STOP)
                s.close()
            except OSError:
                pass
        self._socks = []
        self._listener.close()


class FollowerChannel:
    def __init__(self, host: str, port: int, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def recv(self) -> Optional[list[DeviceOp]]:
        """The next batch of operations; None when the controller stops."""
        header, payload = _recv_frame(self.sock)
        if header == _STOP:
            return None
        return decode_ops(header, payload)


def _wait(handle) -> None:
    """Waits for a step's result: an instance's InFlight, or a pipeline group's list of them."""
    for h in (handle if isinstance(handle, list) else [handle] if handle is not None else []):
        h.wait()


def follow(cluster, channel: FollowerChannel) -> int:
    """Replays the controller's operations on this process until it stops; returns the ops run.
    What the controller had compiled and this process has not yet (its background compiler may lag)
    is compiled when an operation needs it."""
    from kunjax.runtime.executables import StepExecutables

    StepExecutables.compile_on_demand = True
    count = 0
    pending: dict = {}  # unit index -> its step in flight
    while True:
        try:
            ops = channel.recv()
        except ConnectionError:
            log.warning("controller went away; follower stops")
            break
        if ops is None:
            break
        for op in ops:
            # Like the controller: one step in flight per unit, so a unit's next step waits for its
            # previous one; a cluster operation (a drop piece, a restore) waits for every unit.
            if op.kind == STEP:
                _wait(pending.pop(op.target, None))
            else:
                for h in pending.values():
                    _wait(h)
                pending.clear()
            result = cluster.execute(op)
            if op.kind == STEP:
                pending[op.target] = result
        count += len(ops)
    return count
