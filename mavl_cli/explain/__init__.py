"""Explanation maps: how a model's score for a label spreads over the film (maps), the CAM-style
methods behind them (heatmaps), and how well maps point at drawn findings (mapeval).
"""
