"""Scoring predictions against labels: metrics, bootstrap CIs, thresholds, calibration, subgroups
and paired comparisons. Works on arrays; knows nothing of models or encoders.
"""
