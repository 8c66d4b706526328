"""Synthetic chest films (phantoms) with known findings and masks, and small trees in each data
set's own layout, for the demo, benchmarks and tests.
"""
