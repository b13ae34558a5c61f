"""pdray: text-to-3D with Variational Score Distillation (ProlificDreamer), scaled out with Ray."""

__version__ = "0.1.0"
