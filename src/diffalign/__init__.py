"""diffalign: alignment techniques for pretrained diffusion models (see SPEC.md)."""

__version__ = "0.1.0"
