"""Renderers: differentiable volume rendering of neural fields."""
