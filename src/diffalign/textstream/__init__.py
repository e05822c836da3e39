"""T: text-stream residual injection for MMDiT (seeds 002, 000)."""
