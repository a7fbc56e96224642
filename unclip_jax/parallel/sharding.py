"""Meshes with axes (data, fsdp, tensor) and logical-axis rule presets (DESIGN decision 2).

Pure data parallelism is the mesh (N, 1, 1); FSDP and tensor parallelism are other shapes of the
same mesh with other rules. The batch is always split over data x fsdp.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unclip_jax.models import axes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

_BATCH = (axes.BATCH, ("data", "fsdp"))

# Rules are (logical name, mesh axis or axes or None); names not listed are replicated.
RULE_PRESETS: dict[str, tuple[tuple[str, object], ...]] = {
    # Parameters replicated, the batch split over every device.
    "data_parallel": (_BATCH,),
    # Parameters and optimizer state sharded over fsdp along their model-width axis.
    "fsdp": (
        _BATCH,
        (axes.EMBED, "fsdp"),
        (axes.CONV_OUT, "fsdp"),
        (axes.VOCAB, None),
    ),
    # FSDP, plus attention heads and MLP widths split over tensor.
    "fsdp_tp": (
        _BATCH,
        (axes.EMBED, "fsdp"),
        (axes.CONV_OUT, "fsdp"),
        (axes.HEADS, "tensor"),
        (axes.MLP, "tensor"),
    ),
}


def rules_for(preset_or_rules) -> tuple[tuple[str, object], ...]:
    """A preset name, or an explicit rules sequence (as a config holds it), as a rules tuple."""
    if isinstance(preset_or_rules, str):
        if preset_or_rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding preset {preset_or_rules!r}; "
                             f"expected one of {sorted(RULE_PRESETS)}")  # fmt: skip
        return RULE_PRESETS[preset_or_rules]
    return tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in preset_or_rules)


def create_mesh(shape: Sequence[tuple[str, int]], devices=None) -> Mesh:
    """A mesh from (axis, size) pairs; one size may be -1 (the remaining devices).

    Axes are Auto (linen's logical constraints need it; jax.make_mesh defaults to Explicit).
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in shape)
    sizes = [int(size) for _, size in shape]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if devices.size % known:
            raise ValueError(f"{devices.size} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = devices.size // known
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(names, sizes, strict=True))} needs {int(np.prod(sizes))} "
                         f"devices, have {devices.size}")  # fmt: skip
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices.ravel())  # fmt: skip


def logical_shardings(abstract_boxed, mesh: Mesh, rules):
    """NamedShardings for a tree of (boxed, e.g. from jax.eval_shape of init) variables.

    A dimension that its mesh axes do not divide is replicated instead (jit refuses uneven
    shardings): e.g. a UNet's 6-channel output conv under 64-way FSDP.
    """
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules_for(rules))
    return jax.tree.map(_divisible, shardings, nn.meta.unbox(abstract_boxed))


def _divisible(sharding, leaf):
    """`sharding` with the mesh axes of every dimension of `leaf` they do not divide dropped."""
    shape = getattr(leaf, "shape", None)
    if shape is None or not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    fitted = []
    for size, entry in zip(shape, spec, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = int(np.prod([sharding.mesh.shape[name] for name in names]))
        fitted.append(entry if size % ways == 0 else None)
    if tuple(fitted) == spec:
        return sharding
    log.debug("shape %s: %s does not divide it, now %s", shape, spec, tuple(fitted))
    return NamedSharding(sharding.mesh, PartitionSpec(*fitted))


def sharded_init(create_fn, mesh: Mesh, rules, *args):
    """Run `create_fn(*args)` (boxed variables, or a state holding them) sharded from birth.

    Shapes come from jax.eval_shape, shardings from the logical names, and the jitted creation
    writes every array straight into its shards: nothing is materialised on one device
    (DESIGN decision 3). Returns (unboxed result, its NamedShardings).
    """
    rules = rules_for(rules)
    abstract = jax.eval_shape(create_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        created = jax.jit(create_fn, out_shardings=shardings)(*args)
    return nn.meta.unbox(created), shardings
