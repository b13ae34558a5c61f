"""2D diffusion priors (through diffusers) and the camera-conditioned LoRA."""
