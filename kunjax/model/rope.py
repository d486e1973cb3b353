"""Rotary position embeddings in the Hugging Face (rotate-half) convention, with Llama 3.1 scaling.

The inverse frequencies are computed in numpy at trace time: they are constants of the config, so
XLA folds them into the executable instead of recomputing them each step.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from kunjax.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """x: (..., T, heads, head_dim); positions: (..., T). Angles in f32, result in x.dtype."""
    inv_freq = jnp.asarray(inv_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., T, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # (..., T, 1, hd)
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
