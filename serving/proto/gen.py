"""Regenerates kunjax_pb2.py / kunjax_pb2_grpc.py from kunjax.proto (`python -m serving.proto.gen`).

The generated modules are committed, so serving needs only the protobuf and grpcio runtimes;
grpcio-tools is needed only to regenerate. `tests/test_server.py` checks they are up to date.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROTO = "serving/proto/kunjax.proto"
OUTPUTS = ("kunjax_pb2.py", "kunjax_pb2_grpc.py", "kunjax_pb2.pyi")


def generate(out_root: str) -> None:
    """Writes the modules under out_root/serving/proto/ (imports stay `serving.proto.kunjax_pb2`)."""
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
                      f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", os.path.join(ROOT, PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")


def check() -> list[str]:
    """Names of the committed modules that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        stale = []
        for name in OUTPUTS:
            fresh = open(os.path.join(tmp, "serving", "proto", name)).read()
            path = os.path.join(HERE, name)
            if not os.path.exists(path) or open(path).read() != fresh:
                stale.append(name)
        return stale


if __name__ == "__main__":
    if "--check" in sys.argv:
        bad = check()
        print("stale: " + ", ".join(bad) if bad else "up to date")
        sys.exit(1 if bad else 0)
    generate(ROOT)
    print("generated", ", ".join(OUTPUTS))
