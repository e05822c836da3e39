"""Toy branch: one-step class-conditional generators on small real image data (seed 001)."""
