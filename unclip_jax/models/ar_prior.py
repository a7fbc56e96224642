"""unCLIP's autoregressive prior (SPEC 3.3): CLIP image embeddings as a sequence of discrete codes.

The codec (`EmbeddingCodec`, fitted once on the training set in float64 NumPy, then frozen):
- PCA: z -> (z - mean) @ components.T keeps the leading `n_components` principal axes (319 of
  1024 in the paper), ordered by decreasing eigenvalue.
- Buckets: each principal coordinate is quantised into `n_buckets` (1024) **equal-mass buckets**:
  the edges are the coordinate's training quantiles at i / n_buckets. The paper leaves the scheme
  open (SPEC 7.16). Quantiles use every code equally often (the marginal of each code is uniform,
  so no output class is wasted on empty tails) and put resolution where the data is dense; uniform
  bins over the range of a roughly Gaussian coordinate would leave most tail buckets nearly empty
  and make the central ones several times coarser. A bucket decodes to its **centre**, the mean
  of the training values that fell in it (the MSE-optimal value for that cell; empty cells, which
  occur only when there are fewer examples than buckets, use the midpoint of their edges).
- Dot-product bins: the cosine similarity of (z_i, z_t) is quantised into `n_dot_bins` equal-mass
  bins, again by training quantiles (unspecified in the paper, SPEC 7.16). Cosine rather than the
  raw dot product makes the token independent of the embeddings' scale (OpenAI's z are unit-norm,
  Karlo's raw CLIP outputs are not). Equal-mass bins make "the p-th percentile of the training
  distribution" land in bin ~p/100 * n_dot_bins; the codec also keeps the training percentiles
  (0..100) so that sampling can ask for any percentile.

The codec is a pytree of arrays that lives outside the trainable params (the loss and the sampler
take it as an argument), so the optimizer never sees it; `to_dict`/`from_dict` give the plain
dict of arrays that is saved with the checkpoint.

The network (`ARPrior`): one causal (decoder-only) transformer over
    [caption tokens (T) | CLIP text embedding (1) | dot-product token (1) | codes c_0..c_{K-2}]
whose outputs at positions T+1 .. T+K predict c_0 .. c_{K-1} (1024-way logits each). The paper
uses a separate text encoder (ctx 256, width 2048, 24 layers) and a latent decoder (ctx 384,
width 1664, 24 layers, 26 heads); here one transformer of the decoder's size reads the whole
sequence (a documented simplification: one stack, one KV cache; it comes to ~0.9B parameters,
close to the paper's "1B", whereas the two stacks as listed would be ~2B). Caption tokens are
embedded by the prior's own token embedding (the paper trains its text encoder from scratch);
text padding is masked out as keys.

Classifier-free guidance: with `null[b]` set, the caption is removed (every caption key masked,
as an empty caption), and the text-embedding and dot-product tokens are replaced by learned
vectors (`null_text_embedding`, `null_dot_embedding`). The dot token is dropped too because
z_i . z_t means nothing without a text: the null branch models p(z_i), and guidance amplifies the
text and the requested similarity together.

KV cache: every attention layer can read and write a cache of keys/values [B, L, H, Dh] for the
full sequence length L = T + K + 1; `prefill` runs the prefix, `decode` one code at a time, so
sampling costs O(L) per token. The full forward (training) uses the same layers without a cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unclip_jax.models import axes
from unclip_jax.models.clip_layers import MLP, HeadsProjection, normal_init
from unclip_jax.models.layers import Dtype, dense, layer_norm

_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.EMBED)
N_PERCENTILES = 101  # the codec keeps the training dot products at percentiles 0, 1, ..., 100


# ------------------------------------------------------------------------------------------------
# The codec: PCA, per-component quantile buckets, dot-product bins.


@struct.dataclass
class EmbeddingCodec:
    """Frozen arrays that map CLIP image embeddings [.., D] to codes [.., K] int32 and back.

    mean [D], components [K, D] (rows: principal axes, decreasing eigenvalue), eigenvalues [K],
    edges [K, N-1] (bucket boundaries, increasing), centres [K, N], dot_edges [M-1],
    dot_percentiles [101] (training cosine similarities at percentiles 0..100).
    """

    mean: Any
    components: Any
    eigenvalues: Any
    edges: Any
    centres: Any
    dot_edges: Any
    dot_percentiles: Any

    @property
    def n_components(self) -> int:
        return self.components.shape[0]

    @property
    def n_buckets(self) -> int:
        return self.centres.shape[1]

    @property
    def n_dot_bins(self) -> int:
        return self.dot_edges.shape[0] + 1

    def project(self, z):
        """Principal coordinates [.., K] of embeddings [.., D]."""
        return (jnp.asarray(z, jnp.float32) - self.mean) @ self.components.T

    def unproject(self, coeffs):
        """Embeddings [.., D] from principal coordinates [.., K] (the inverse PCA)."""
        return coeffs @ self.components + self.mean

    def quantize(self, coeffs):
        """Bucket indices [B, K] int32: bucket i holds edges[i-1] <= x < edges[i]."""
        search = jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"), (0, 1), 1)
        return search(self.edges, jnp.asarray(coeffs, jnp.float32)).astype(jnp.int32)

    def dequantize(self, codes):
        """Bucket centres [B, K] for codes [B, K]."""
        return self.centres[jnp.arange(self.n_components)[None], codes]

    def encode(self, z):
        """Codes [B, K] int32 of embeddings [B, D]."""
        return self.quantize(self.project(z))

    def decode(self, codes):
        """Embeddings [B, D] (raw CLIP space) from codes [B, K]."""
        return self.unproject(self.dequantize(codes))

    def encode_dot(self, similarity):
        """Dot-product tokens [B] int32 for cosine similarities [B]."""
        return jnp.searchsorted(self.dot_edges, similarity, side="right").astype(jnp.int32)

    def dot_token(self, image_emb, text_emb):
        """The dot-product token [B] of embedding pairs [B, D] (cosine similarity, then bins)."""
        return self.encode_dot(cosine_similarity(image_emb, text_emb))

    def dot_token_at_percentile(self, percentile):
        """The token of the training similarity at `percentile` (0..100, scalar or [B])."""
        grid = jnp.linspace(0.0, 100.0, N_PERCENTILES)
        return self.encode_dot(jnp.interp(percentile, grid, self.dot_percentiles))

    def to_dict(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d) -> EmbeddingCodec:
        return cls(**{k: jnp.asarray(d[k], jnp.float32) for k in cls.__dataclass_fields__})


def cosine_similarity(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    return num / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


def fit_pca(embeddings, n_components: int, chunk: int = 65536):
    """PCA in float64: (mean [D], components [K, D], eigenvalues [K], relative error).

    The covariance is accumulated in chunks (millions of embeddings fit in memory as a stream of
    [chunk, D] blocks). The relative error is the mean squared reconstruction error over the mean
    squared deviation from the mean (the fraction of variance dropped; SPEC 3.3: <1% for 319/1024).
    """
    x = np.asarray(embeddings)
    n, d = x.shape
    if not 0 < n_components <= d:
        raise ValueError(f"n_components must be in 1..{d}, got {n_components}")
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), np.float64)
    for start in range(0, n, chunk):
        block = x[start : start + chunk].astype(np.float64) - mean
        cov += block.T @ block
    cov /= n
    eigenvalues, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.maximum(eigenvalues[order], 0.0)
    components = vectors[:, order[:n_components]].T
    total = eigenvalues.sum()
    error = float(eigenvalues[n_components:].sum() / total) if total > 0 else 0.0
    return mean, components, eigenvalues[:n_components], error


def fit_buckets(coeffs, n_buckets: int):
    """Per-component equal-mass buckets: (edges [K, N-1], centres [K, N]) from coeffs [n, K]."""
    c = np.asarray(coeffs, np.float64)
    q = np.arange(1, n_buckets) / n_buckets
    edges = np.quantile(c, q, axis=0).T  # [K, N-1]
    centres = np.empty((c.shape[1], n_buckets))
    lo, hi = c.min(axis=0), c.max(axis=0)
    for k in range(c.shape[1]):
        idx = np.searchsorted(edges[k], c[:, k], side="right")
        counts = np.bincount(idx, minlength=n_buckets)
        sums = np.bincount(idx, weights=c[:, k], minlength=n_buckets)
        bounds = np.concatenate([[lo[k]], edges[k], [hi[k]]])
        midpoints = 0.5 * (bounds[:-1] + bounds[1:])
        centres[k] = np.where(counts > 0, sums / np.maximum(counts, 1), midpoints)
    return edges, centres


def fit_dot_bins(similarities, n_bins: int):
    """Equal-mass bins of the training similarities: (edges [M-1], percentiles [101])."""
    s = np.asarray(similarities, np.float64)
    edges = np.quantile(s, np.arange(1, n_bins) / n_bins)
    return edges, np.percentile(s, np.linspace(0.0, 100.0, N_PERCENTILES))


def fit_codec(image_emb, text_emb, *, n_components: int = 319, n_buckets: int = 1024,
              n_dot_bins: int = 1024) -> tuple[EmbeddingCodec, dict]:  # fmt: skip
    """Fit the codec on training pairs image_emb [n, D], text_emb [n, D] (NumPy, raw CLIP space).

    Returns (codec, stats): stats holds the PCA's relative error (`pca_relative_error`) and the
    float32 round trip through the buckets (`bucket_relative_error`, relative to the variance).
    The quantiles hold all examples in float64 ([n, K]): for very large sets pass a random
    subset (a million pairs pin 1024 quantiles down to ~1e-3 of a bucket's mass). Fit on at
    least ~64 examples per bucket: from fewer, the estimated edges and centres of the tail
    buckets add several times the buckets' own quantisation error (measured at the paper's size
    in tests/test_ar_prior.py: 1.4x the closed form from 64 per bucket, 3.7x from 32).
    """
    mean, components, eigenvalues, pca_error = fit_pca(image_emb, n_components)
    x = np.asarray(image_emb, np.float64)
    coeffs = (x - mean) @ components.T
    edges, centres = fit_buckets(coeffs, n_buckets)
    sim = np.asarray(cosine_similarity(np.asarray(image_emb), np.asarray(text_emb)))
    dot_edges, dot_percentiles = fit_dot_bins(sim, n_dot_bins)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    codec = EmbeddingCodec(f32(mean), f32(components), f32(eigenvalues), f32(edges), f32(centres),
                           f32(dot_edges), f32(dot_percentiles))  # fmt: skip
    sub = x[:16384]  # the round-trip statistic (a mean) needs no more examples than this
    recon = np.asarray(codec.decode(codec.encode(sub)), np.float64)
    variance = np.mean(np.sum((sub - mean) ** 2, axis=-1))
    bucket_error = float(np.mean(np.sum((recon - sub) ** 2, axis=-1)) / max(variance, 1e-30))
    return codec, {"pca_relative_error": pca_error, "bucket_relative_error": bucket_error}


# ------------------------------------------------------------------------------------------------
# The network.


class Block(nn.Module):
    """Pre-LN causal self-attention + MLP; reads and writes an optional KV cache.

    x [B, Lq, W] float32 at absolute positions start .. start+Lq-1; allowed [B, 1, Lq, Lk] bool.
    Without a cache the keys are x's own (Lk = Lq, start = 0); with cache (k, v) [B, Lk, H, Dh]
    the new keys/values are written at `start` and attention reads the whole cache.
    Returns (x, (k, v)).
    """

    heads: int
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, allowed, cache=None, start=0):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        head_dim = width // self.heads
        in_std = width**-0.5 * (2 * self.num_layers) ** -0.5
        h = layer_norm(self.param_dtype, name="ln_1")(x)
        proj = lambda n: HeadsProjection(self.heads, head_dim, "split", in_std, name=n, **kw)  # noqa: E731
        q, k, v = proj("q_proj")(h), proj("k_proj")(h), proj("v_proj")(h)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, 1)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed, logits * head_dim**-0.5, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(self.dtype))
        out = HeadsProjection(self.heads, head_dim, "merge", width**-0.5, name="out_proj", **kw)(
            out
        )
        x = x + out.astype(jnp.float32)
        h = layer_norm(self.param_dtype, name="ln_2")(x)
        x = x + MLP(4 * width, "gelu", self.num_layers, name="mlp", **kw)(h).astype(jnp.float32)
        return nn.with_logical_constraint(x, _ACTIVATION), (k, v)


class ARPrior(nn.Module):
    """Causal transformer predicting PCA-bucket codes of z_i after a text prefix.

    Inputs: tokens [B, T] int and mask [B, T] bool (True = real token), text_emb [B, D] (raw CLIP
    text embedding), dot [B] int (dot-product token), codes [B, K] int, null [B] bool.
    `__call__` (teacher forcing) returns logits [B, K, n_buckets] float32.
    """

    vocab_size: int = 49408
    text_ctx: int = 256
    n_components: int = 319
    n_buckets: int = 1024
    n_dot_bins: int = 1024
    width: int = 1664
    layers: int = 24
    heads: int = 26
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def prefix_len(self) -> int:
        return self.text_ctx + 2

    @property
    def seq_len(self) -> int:
        return self.text_ctx + self.n_components + 1

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = lambda n, rows: nn.Embed(  # noqa: E731
            rows, self.width, embedding_init=normal_init(0.02, (axes.VOCAB, axes.EMBED)),
            name=n, **kw,
        )  # fmt: skip
        self.token_embedding = emb("token_embedding", self.vocab_size)
        self.code_embedding = emb("code_embedding", self.n_buckets)
        self.dot_embedding = emb("dot_embedding", self.n_dot_bins)
        self.text_emb_proj = dense(self.width, (axes.JOINT_EMBED, axes.EMBED), name="text_emb_proj",
                                   **kw)  # fmt: skip
        vec = normal_init(0.02, (axes.EMBED,))
        self.null_text_embedding = self.param("null_text_embedding", vec, (self.width,),
                                              self.param_dtype)  # fmt: skip
        self.null_dot_embedding = self.param("null_dot_embedding", vec, (self.width,),
                                             self.param_dtype)  # fmt: skip
        self.positional_embedding = self.param(
            "positional_embedding", normal_init(0.01, (axes.LENGTH, axes.EMBED)),
            (self.seq_len, self.width), self.param_dtype,
        )  # fmt: skip
        block = nn.remat(Block) if self.remat else Block
        self.blocks = [block(self.heads, self.layers, name=f"layers_{i}", **kw)
                       for i in range(self.layers)]  # fmt: skip
        self.final_ln = layer_norm(self.param_dtype, name="final_ln")
        self.out_proj = dense(self.n_buckets, (axes.EMBED, axes.VOCAB), name="out_proj", **kw)

    # -- pieces --------------------------------------------------------------------------------

    def _prefix(self, tokens, mask, text_emb, dot, null):
        """Prefix embeddings [B, T+2, W] float32 and key validity [B, T+2]."""
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx or tokens.shape != mask.shape:
            raise ValueError(f"expected tokens and mask of shape [B, {self.text_ctx}], got "
                             f"{tokens.shape} and {mask.shape}")  # fmt: skip
        null = jnp.asarray(null, bool)[:, None]
        text = self.token_embedding(tokens).astype(jnp.float32)
        zt = self.text_emb_proj(text_emb.astype(self.dtype)).astype(jnp.float32)
        zt = jnp.where(null, self.null_text_embedding.astype(jnp.float32)[None], zt)
        d = self.dot_embedding(dot).astype(jnp.float32)
        d = jnp.where(null, self.null_dot_embedding.astype(jnp.float32)[None], d)
        x = jnp.concatenate([text, zt[:, None], d[:, None]], axis=1)
        x = x + self.positional_embedding[: self.prefix_len].astype(jnp.float32)[None]
        valid = jnp.concatenate(
            [mask.astype(bool) & ~null, jnp.ones((tokens.shape[0], 2), bool)], axis=1
        )
        return x, valid

    def _codes(self, codes, start):
        """Embeddings [B, n, W] of codes [B, n] placed at positions start .. start+n-1."""
        pos = jax.lax.dynamic_slice_in_dim(self.positional_embedding, start, codes.shape[1], 0)
        return self.code_embedding(codes).astype(jnp.float32) + pos.astype(jnp.float32)[None]

    def _logits(self, h):
        return self.out_proj(self.final_ln(h).astype(self.dtype)).astype(jnp.float32)

    @staticmethod
    def _allowed(valid, start, length):
        """[B, 1, length, Lk]: key j visible to the query at position start+i iff j <= start+i."""
        q_pos = start + jnp.arange(length)[:, None]
        causal = jnp.arange(valid.shape[1])[None] <= q_pos
        return (causal[None] & valid[:, None])[:, None]

    # -- entry points --------------------------------------------------------------------------

    def __call__(self, tokens, mask, text_emb, dot, codes, null):
        """Teacher forcing: logits [B, K, n_buckets] for codes [B, K]."""
        x, valid = self._prefix(tokens, mask, text_emb, dot, null)
        x = jnp.concatenate([x, self._codes(codes[:, :-1], self.prefix_len)], axis=1)
        valid = jnp.concatenate([valid, jnp.ones(codes[:, :-1].shape, bool)], axis=1)
        x = nn.with_logical_constraint(x, _ACTIVATION)
        allowed = self._allowed(valid, 0, x.shape[1])
        for block in self.blocks:
            x, _ = block(x, allowed)
        return self._logits(x[:, self.prefix_len - 1 :])

    def prefill(self, tokens, mask, text_emb, dot, null):
        """Run the prefix: (logits of c_0 [B, n_buckets], cache, key validity [B, L]).

        cache: one (k, v) pair [B, L, H, Dh] per layer (L = seq_len), filled up to the prefix.
        """
        x, valid = self._prefix(tokens, mask, text_emb, dot, null)
        b, p = valid.shape
        valid = jnp.concatenate([valid, jnp.ones((b, self.seq_len - p), bool)], axis=1)
        allowed = self._allowed(valid, 0, p)
        shape = (b, self.seq_len, self.heads, self.width // self.heads)
        cache = []
        for block in self.blocks:
            empty = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            x, kv = block(x, allowed, empty, 0)
            cache.append(kv)
        return self._logits(x[:, -1]), cache, valid

    def decode(self, code, index, cache, valid):
        """Feed code c_index [B] (index traced, 0 .. K-2): (logits of c_{index+1}, cache)."""
        start = self.prefix_len + index
        x = self._codes(code[:, None], start)
        allowed = self._allowed(valid, start, 1)
        new_cache = []
        for block, kv in zip(self.blocks, cache, strict=True):
            x, kv = block(x, allowed, kv, start)
            new_cache.append(kv)
        return self._logits(x[:, 0]), new_cache


def ar_prior_from_config(model_config, dtype=jnp.float32) -> ARPrior:
    """The ARPrior of a config's `model` section (configs/prior_ar.py)."""
    m = model_config
    return ARPrior(vocab_size=m.vocab_size, text_ctx=m.text_ctx, n_components=m.n_components,
                   n_buckets=m.n_buckets, n_dot_bins=m.n_dot_bins, width=m.width, layers=m.layers,
                   heads=m.heads, remat=m.get("remat", False), dtype=dtype)  # fmt: skip


def init_inputs(model: ARPrior, clip_dim: int, batch: int = 1):
    """Zero inputs for `model.init`: (tokens, mask, text_emb, dot, codes, null)."""
    return (
        jnp.zeros((batch, model.text_ctx), jnp.int32),
        jnp.ones((batch, model.text_ctx), bool),
        jnp.zeros((batch, clip_dim), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, model.n_components), jnp.int32),
        jnp.zeros((batch,), bool),
    )
