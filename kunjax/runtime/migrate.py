"""Live migration's device half: the KV pages of a request copied from one instance to another.

The control plane (kunjax.control.migration) decides what to copy, piece by piece; each piece is
one `MIGRATE_COPY` cluster operation (logged, so every process of a multi-host cluster copies its
shards at the same point). Per layer, the pages go through the exchange's compiled page gather on
the source mesh, a device-to-device transfer, and its compiled page scatter into the destination's
donated pool (kunjax.memory.exchange.copy_pages); the bytes and seconds come from that copy.
"""

from __future__ import annotations

from kunjax.control.migration import MIGRATE_COPY, MigrationController, install as install_policy
from kunjax.control.ops import DeviceOp
from kunjax.memory.exchange import ExchangeStats, copy_pages
from kunjax.runtime.executables import GATHER, SCATTER, ExeKey
from kunjax.runtime.kv_pools import K, V

CHUNK_PAGES = 16  # pages per compiled gather / scatter call


def copy_keys(engine) -> list[ExeKey]:
    return [ExeKey(kind, CHUNK_PAGES, 0, 0, engine.stage.num_pages, part) for kind in (GATHER, SCATTER) for part in (K, V)]


def execute_copy(cluster, op: DeviceOp) -> dict:
    src, dst = cluster.units[op.args["src"]], cluster.units[op.args["dst"]]
    stats = ExchangeStats()
    for layer in src.stage.layer_ids:
        dst.stage.pools[layer] = copy_pages(src.stage, src.stage.pools[layer], dst.stage, dst.stage.pools[layer],
                                            op.args["src_pages"], op.args["dst_pages"], CHUNK_PAGES, stats,
                                            event="migrate")
    return {"bytes": stats.bytes_between_devices + stats.bytes_local, "seconds": stats.seconds}


def install(cluster) -> MigrationController:
    """Live migration on a serving cluster: the copy operation registered, its executables compiled
    (at start-up, never on the request path), every instance given the migrate policy."""
    for e in cluster.engines:
        e.exes.compile(copy_keys(e))
    cluster.register_op(MIGRATE_COPY, execute_copy)
    return install_policy(cluster, piece_pages=CHUNK_PAGES)
