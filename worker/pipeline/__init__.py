"""The worker's per-image stages, each a module with one entry point and its CPU (OpenCV/numpy) and device
(torch) paths behind it:

    decode.decode_rgb         bytes -> (H, W, 3) uint8 RGB (libjpeg-turbo fast path, Pillow otherwise)
    prepare.prepare           RGB -> network input at the operating resolution (on the device on CUDA)
    (worker.batcher / worker.engine: the forward)
    postprocess.postprocess   logits -> Mask: probabilities at the image's size, made 8-bit here only
    render.render             (image, Mask, params) -> RenderedOutputs: refine, crop, background, encode
    encode.encode             uint8 pixels -> EncodedImage, one function for every output format

types.py holds the values they pass (no stage imports another's internals; nothing here imports
worker.engine). A video's frames go through the same functions, one frame per call, in parallel threads
that share the batched forward.
"""
