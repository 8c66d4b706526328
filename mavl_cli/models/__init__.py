"""Model components: backbones, text encoders, the LRF head and the fusion model."""
