"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, per-request seeds; and,
in the head's penalty variant only, min-p, repetition / frequency / presence penalties and logprobs.

Each request's key for its i-th generated token is fold_in(PRNGKey(seed), i), so sampled output
depends only on the request (seed, prompt, params), never on what else shares the batch or on a
preemption that recomputes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filtered_sample(logits, temperature, top_k, top_p, seeds, counters, min_p=None):
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
    if min_p is not None:  # keep tokens at least min_p times as likely as the most likely one
        top = jnp.max(scaled, axis=-1, keepdims=True)
        masked = jnp.where(scaled >= top + jnp.log(min_p)[:, None], masked, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample(logits, temperature, top_k, top_p, seeds, counters, min_p=None):
    """logits (R, V) f32 -> token ids (R,). Rows with temperature 0 are greedy. `min_p` (R,) only in
    the penalty variant of the head (0 keeps every token)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _filtered_sample(logits, temperature, top_k, top_p, seeds, counters, min_p),
        lambda: greedy,
    )
    return jnp.where(temperature > 0, sampled, greedy)


TOP_LOGPROBS = 5  # the most alternatives a request may ask for (the OpenAI API allows 0..5 on completions)


def apply_penalties(logits, history, prompt_lens, repetition, frequency, presence):
    """Penalised logits (R, V). `history` (R, H): each row's prompt and generated tokens, -1 padded;
    the first prompt_lens[r] are the prompt.

    - repetition (transformers' RepetitionPenaltyLogitsProcessor, vLLM's repetition_penalty): every
      token that occurs in the prompt or the output has its logit divided by the penalty when
      positive, multiplied when negative; 1 is off.
    - frequency / presence (the OpenAI API's definition): logit - frequency * count - presence *
      (count > 0), count = occurrences in the generated tokens only; 0 is off.
    Neutral values leave a row's logits bit-identical (x * 1, x / 1, x - 0)."""
    R, V = logits.shape
    valid = history >= 0
    ids = jnp.where(valid, history, 0)
    rows = jnp.arange(R)[:, None]
    generated = valid & (jnp.arange(history.shape[1])[None, :] >= prompt_lens[:, None])
    counts = jnp.zeros((R, V), jnp.float32).at[rows, ids].add(generated.astype(jnp.float32))
    seen = jnp.zeros((R, V), jnp.bool_).at[rows, ids].max(valid)
    rep = repetition[:, None]
    out = jnp.where(seen, jnp.where(logits < 0, logits * rep, logits / rep), logits)
    return out - frequency[:, None] * counts - presence[:, None] * (counts > 0).astype(jnp.float32)


def token_logprobs(logits, tokens):
    """The sampled tokens' log-probabilities (R,) and the TOP_LOGPROBS most likely tokens per row
    (values, ids), all under the model's own distribution (before penalties and temperature, as
    vLLM's default)."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_vals, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
    return chosen, top_vals, top_ids.astype(jnp.int32)
