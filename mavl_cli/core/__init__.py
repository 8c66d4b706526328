"""The ground floor: errors, defaults, limits, option specs, terminal output, devices, threads, version.

Imports nothing else from mavl. The modules the command line loads at start (errors, defaults,
limits, options, console, sanitize, version) import nothing heavy: no torch, numpy or pandas.
"""
