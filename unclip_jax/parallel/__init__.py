"""Device meshes and the logical-axis rules that map parameter and activation names onto them."""

from typing import TYPE_CHECKING

from unclip_jax._lazy import lazy_exports

if TYPE_CHECKING:  # the names, for readers and type checkers; at run time they load on first use
    from unclip_jax.parallel.sharding import (
        MESH_AXES,
        RULE_PRESETS,
        create_mesh,
        logical_shardings,
        rules_for,
        sharded_init,
    )

_EXPORTS = {
    "MESH_AXES": "sharding",
    "RULE_PRESETS": "sharding",
    "create_mesh": "sharding",
    "logical_shardings": "sharding",
    "rules_for": "sharding",
    "sharded_init": "sharding",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "MESH_AXES",
    "RULE_PRESETS",
    "create_mesh",
    "logical_shardings",
    "rules_for",
    "sharded_init",
]
