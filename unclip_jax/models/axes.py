"""Logical axis names: the one vocabulary that parameters and activations are annotated with.

Configs map these names onto mesh axes (`data`, `fsdp`, `tensor`) with a rules table; a parameter
without names would be replicated silently, so every parameter gets some.
"""

BATCH = "batch"
EMBED = "embed"  # model width (residual stream, channels)
MLP = "mlp"  # hidden width of feed-forward layers
HEADS = "heads"
KV = "kv"  # per-head width
LENGTH = "length"  # sequence positions
VOCAB = "vocab"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"
CONV_IN = "conv_in"  # input channels of a convolution kernel
CONV_OUT = "conv_out"  # output channels of a convolution kernel
NORM = "norm"  # scales and biases of normalisation layers
JOINT_EMBED = "joint_embed"  # CLIP's shared image-text embedding space (projection outputs)
TIMESTEPS = "timesteps"  # rows of a learned per-timestep table (the noise-aware CLIP)
