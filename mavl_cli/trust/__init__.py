"""Trust at the point of use: provenance of a model file, and out-of-distribution flags for films
unlike the training data.
"""
