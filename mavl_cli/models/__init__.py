"""What a mavl model is: the LRF head, the fusion model, zero-shot heads, the model file and the
end-to-end :class:`~mavl_cli.models.mavlmodel.MavlModel` built from it; the embedding engine.
"""
