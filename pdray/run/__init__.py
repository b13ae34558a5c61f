"""The run loop every executor shares, the one-process executor, and the mesh stage."""
