"""Classifier-free guidance by batching (SPEC 1.6).

The conditional and the null inputs are concatenated along the batch, [cond; null] (GLIDE and
Karlo's order), and the network runs once on 2B examples. The guided prediction is
    pred = pred_null + s * (pred_cond - pred_null)
on whatever the network predicts (eps for eps models, x_0 for the prior, v for v models). A learned
variance is not guided: the conditional branch's variance channels are kept. The scale s is an array
[B], one per example, so that a sweep over scales is one compilation and can be one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import DiffusionTable, split_model_output


def _check_batch(tree, batch: int, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
                f"every conditioning array needs the batch ({batch}) as its first axis"
            )


def model_output(
    model_fn, table: DiffusionTable, params, x, t_model, cond, null_cond=None, guidance_scale=None
):
    """The raw network output at x [B, ...], guided when `null_cond` is given.

    model_fn(params, x, t_model, cond) -> output [B, ..., C or 2C]. `cond` and `null_cond` are
    pytrees with the same structure whose leaves have the batch as their first axis.
    `guidance_scale` is a scalar or [B]; scale 1 is the conditional prediction, 0 the null one.
    """
    if null_cond is None:
        return model_fn(params, x, t_model, cond)
    batch = x.shape[0]
    if jax.tree.structure(cond) != jax.tree.structure(null_cond):
        raise ValueError("cond and null_cond must have the same tree structure")
    _check_batch(cond, batch, "cond")
    _check_batch(null_cond, batch, "null_cond")
    if guidance_scale is None:
        raise ValueError("classifier-free guidance needs a guidance_scale (scalar or [B])")
    scale = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (batch,))

    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)
    out = model_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t_model, t_model]), both)
    out = out.astype(jnp.float32)
    pred_cond, var_cond = split_model_output(table, out[:batch])
    pred_null, _ = split_model_output(table, out[batch:])
    scale = scale.reshape((batch,) + (1,) * (pred_cond.ndim - 1))
    guided = pred_null + scale * (pred_cond - pred_null)
    if var_cond is None:
        return guided
    return jnp.concatenate([guided, var_cond], axis=-1)
