"""A cluster simulator driven by the real control plane (no JAX): simulated instances, groups,
transitions and migrations whose time comes from a device model (kunjax.sim.hardware)."""
