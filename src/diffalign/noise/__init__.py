"""N: orthogonal-constrained noise (seed 001)."""
