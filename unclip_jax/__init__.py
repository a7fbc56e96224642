"""unclip-jax: GLIDE and unCLIP (DALL-E 2) text-to-image diffusion in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# transformers (tokenizers only, no torch here) otherwise logs "PyTorch was not found" on import:
# advice for its model classes, which unclip-jax never uses. A user's own setting wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
