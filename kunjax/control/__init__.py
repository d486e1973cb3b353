"""The control plane: requests, page accounting, scheduling, dispatch and overload policies.

Plain Python (and numpy): nothing here imports JAX, so the same decisions drive real devices and a
simulator. tests/test_control_plane.py imports every module of this package with jax made unimportable."""
