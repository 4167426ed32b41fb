"""Video jobs (`fal-ai/birefnet/v2/video`): PyAV decode/encode around the per-frame mask stages."""
