"""Flax linen networks. Every parameter carries logical axis names (see axes.py)."""
