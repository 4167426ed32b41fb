"""The fal-compatible HTTP gateway for fal-ai/birefnet and fal-ai/birefnet/v2 (see FAL_API.md).

Teams coming from fal change the host (and the key); fal's own clients work unchanged.
"""
