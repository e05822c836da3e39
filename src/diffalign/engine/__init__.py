"""Shared engine: loading, tiny models, data, training loop, reports (spec E).

The engine never imports a capability package.
"""
