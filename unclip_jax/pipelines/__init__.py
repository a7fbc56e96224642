"""Sampling pipelines that compose jitted stages on the host (DESIGN decision 7)."""
