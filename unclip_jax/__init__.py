"""unclip-jax: GLIDE and unCLIP (DALL-E 2) text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0"
