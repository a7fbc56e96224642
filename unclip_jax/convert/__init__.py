"""Importers of public weights, with strict key and shape checks: safetensors (CLIP, Karlo), and
GLIDE's torch pickles through torch_pickle's restricted reader, which resolves only tensors,
storages and plain containers and so runs no code from the file (never plain `pickle.load`)."""
