"""The fal-compatible HTTP gateway for fal-ai/birefnet and fal-ai/birefnet/v2 (see FAL_API.md)."""
