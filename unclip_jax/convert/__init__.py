"""Importers of public weights: safetensors only (never unpickle), strict key and shape checks."""
