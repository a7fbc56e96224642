"""Device meshes and the logical-axis rules that map parameter and activation names onto them."""

from unclip_jax.parallel.sharding import (
    MESH_AXES,
    RULE_PRESETS,
    create_mesh,
    logical_shardings,
    rules_for,
    sharded_init,
)

__all__ = [
    "MESH_AXES",
    "RULE_PRESETS",
    "create_mesh",
    "logical_shardings",
    "rules_for",
    "sharded_init",
]
