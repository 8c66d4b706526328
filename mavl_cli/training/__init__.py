"""Training: the LRF head and fusion training (train), the shared loop, backbone fine-tuning,
losses (BCE + truncated nuclear norm) and torchrun helpers.
"""
