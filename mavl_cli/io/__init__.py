"""mavl's files: the safetensors file contract (mavlfile), atomic writes and output guards (files),
image decoding (imageio), resumable checkpoints, shards and label descriptions.
"""
