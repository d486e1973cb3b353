"""Test set-up: 8 virtual CPU devices, configured before jax is first imported."""

import os

# LLVM optimisation level 0 for the tests' own process: the suite is dominated by compiling many
# small executables (0.2-0.5 s each on 2 cores), and O0 compiles them ~40 % faster. XLA's HLO passes
# (fusion, buffer assignment, donation: what the in-place KV checks read) still run, and the numerics
# are the same IEEE operations; the launcher subprocesses and every benchmark keep the default level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocesses the tests launch (the launcher, two-process clusters) share one persistent compilation
# cache for the run, so each compiles the tiny model's shapes once; a fresh directory per run, so
# nothing from an earlier run is reused. Tests that need an empty cache pass their own directory.
if "KUNJAX_COMPILE_CACHE" not in os.environ:
    import tempfile

    os.environ["KUNJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="kunjax-test-jax-cache-")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def host_model():
    """The tiny model with host (numpy) weights: each cluster instance places its own replica."""
    from kunjax.io.loader import load_model

    return load_model("tiny", "float32", place=lambda a: np.asarray(a, np.float32))


@pytest.fixture(scope="module")
def client(server):
    """A gRPC client of the test module's own `server` fixture (a serving.server.ServerThread)."""
    from serving.client import Client

    with Client(f"localhost:{server.port}") as c:
        yield c


def stepped(engine, prompts, params):
    """Runs prompts to the end by stepping the engine the server's way: LLMEngine.generate would
    also compile the shapes an offline run keeps needing (engine.OFFLINE_COMPILE), which tests that
    count compilations must not see."""
    from kunjax.control.cluster import run_to_completion

    return run_to_completion(lambda p, sp: engine.add_request(p, sp).request_id, engine.step, engine.has_unfinished,
                             prompts, params)
