"""Sampling unCLIP's autoregressive prior: text -> codes -> CLIP image embedding (SPEC 3.3).

One jitted function per (model, batch shape): the prefix runs once (`ARPrior.prefill`), then a
`lax.scan` feeds one code per step through the KV cache (`ARPrior.decode`), so a token costs
O(sequence length). Classifier-free guidance batches [cond; null] into one forward pass of 2B
and mixes the logits, null + s (cond - null), with a per-example scale s [B]; the sampled code is
fed to both halves. Temperature and top-k are per-example arrays too (temperature 0 or top-k 1 is
greedy), so sweeps over any of them reuse one compilation. The dot-product token is the training
similarity at `dot_percentile` (50 by default, the paper's best). The codes are decoded through
the bucket centres and the inverse PCA into raw CLIP-space image embeddings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unclip_jax import compile_cache
from unclip_jax.models.ar_prior import ARPrior, EmbeddingCodec


def filter_logits(logits, temperature, top_k):
    """Scaled logits [B, N] for categorical sampling: / temperature, then only the top_k kept.

    temperature [B] (> 0 here; greedy is handled by the caller), top_k [B] int (0 = all).
    Ties at the k-th value are kept, so top_k = 1 can keep several equal maxima.
    """
    n = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, n), n)
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), (n - k)[:, None], axis=-1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return logits / jnp.maximum(temperature, 1e-6)[:, None]


def choose(rng, logits, temperature, top_k):
    """Codes [B]: argmax where temperature == 0 or top_k == 1, else a categorical sample."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(rng, filter_logits(logits, temperature, top_k), axis=-1)
    return jnp.where((temperature <= 0) | (top_k == 1), greedy, sampled).astype(jnp.int32)


def _sample(model: ARPrior, return_logits: bool, params, codec: EmbeddingCodec, tokens, mask,
            text_emb, rng, guidance_scale, temperature, top_k, dot_percentile):  # fmt: skip
    b = tokens.shape[0]
    variables = {"params": params}
    dot = codec.dot_token_at_percentile(jnp.broadcast_to(dot_percentile, (b,)))
    two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    null = jnp.concatenate([jnp.zeros(b, bool), jnp.ones(b, bool)])
    logits2, cache, valid = model.apply(variables, two(tokens), two(mask), two(text_emb),
                                        two(dot), null, method="prefill")  # fmt: skip

    def guide(logits2):
        cond, uncond = logits2[:b], logits2[b:]
        return uncond + guidance_scale[:, None] * (cond - uncond)

    def pick(k, logits):
        return choose(jax.random.fold_in(rng, k), logits, temperature, top_k)

    def body(carry, k):
        logits2, cache = carry
        logits = guide(logits2)
        code = pick(k, logits)
        logits2, cache = model.apply(variables, two(code), k, cache, valid, method="decode")
        return (logits2, cache), (code, logits if return_logits else None)

    steps = model.n_components - 1
    (logits2, _), (codes, all_logits) = jax.lax.scan(body, (logits2, cache), jnp.arange(steps))
    last = guide(logits2)
    codes = jnp.concatenate([codes.T, pick(steps, last)[:, None]], axis=1)
    out = {"codes": codes, "embeddings": codec.decode(codes)}
    if return_logits:
        out["logits"] = jnp.concatenate([jnp.swapaxes(all_logits, 0, 1), last[:, None]], axis=1)
    return out


class ARPriorSampler:
    """A jitted whole-sequence sampler for one ARPrior (params and codec are arguments).

    sampler(params, codec, tokens [B, T], mask [B, T], text_emb [B, D], rng, guidance_scale=[B],
            temperature=[B] or scalar, top_k=[B] or scalar int (0 = off), dot_percentile=50.)
      -> {"codes": [B, K] int32, "embeddings": [B, D] float32 (raw CLIP space)}
    With return_logits=True the guided logits [B, K, N] come back too (one more compilation).
    """

    def __init__(self, model: ARPrior):
        compile_cache.enable()
        self.model = model
        self._jitted = {
            flag: jax.jit(functools.partial(_sample, model, flag)) for flag in (False, True)
        }

    def __call__(
        self,
        params,
        codec: EmbeddingCodec,
        tokens,
        mask,
        text_emb,
        rng,
        *,
        guidance_scale=1.0,
        temperature=1.0,
        top_k=0,
        dot_percentile=50.0,
        return_logits: bool = False,
    ):
        b = tokens.shape[0]
        per_example = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (b,))  # noqa: E731
        return self._jitted[return_logits](
            params, codec, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
            jnp.asarray(text_emb, jnp.float32), rng, per_example(guidance_scale, jnp.float32),
            per_example(temperature, jnp.float32), per_example(top_k, jnp.int32),
            per_example(dot_percentile, jnp.float32),
        )  # fmt: skip

    def compilations(self) -> int:
        """How many executables the sampler holds (tests check that sweeps reuse one)."""
        return sum(f._cache_size() for f in self._jitted.values())
