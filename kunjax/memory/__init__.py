"""Memory: what XLA holds per device (measured), and the parameter-centric mechanism built on it."""
