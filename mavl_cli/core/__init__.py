"""The ground floor: errors, defaults, limits, option specs, terminal output, threads, version.

Imports nothing else from mavl, and nothing heavy (no torch, numpy or pandas).
"""
