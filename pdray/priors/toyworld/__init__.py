"""The toy world: a procedural 3D world, its tiny Stable-Diffusion-format prior, and its judge."""
