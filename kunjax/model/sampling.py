"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, per-request seeds.

Each request's key for its i-th generated token is fold_in(PRNGKey(seed), i), so sampled output
depends only on the request (seed, prompt, params), never on what else shares the batch or on a
preemption that recomputes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filtered_sample(logits, temperature, top_k, top_p, seeds, counters):
    vocab = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # (R, V)
    # top-k: keep logits >= the k-th largest (top_k == 0 keeps all)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    ranks = jnp.arange(vocab)[None, :]
    sorted_masked = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    # top-p over what top-k kept: keep the smallest prefix whose mass reaches top_p
    probs = jax.nn.softmax(sorted_masked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The top-ranked token is always kept: a tiny top_p (whose comparison a CPU may flush to zero)
    # must mean "greedy among the candidates", never "nothing left".
    keep_sorted = ((mass_before < top_p[:, None]) | (ranks == 0)) & (ranks < k[:, None])
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(threshold, kth)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample(logits, temperature, top_k, top_p, seeds, counters):
    """logits (R, V) f32 -> token ids (R,). Rows with temperature 0 are greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _filtered_sample(logits, temperature, top_k, top_p, seeds, counters),
        lambda: greedy,
    )
    return jnp.where(temperature > 0, sampled, greedy)
