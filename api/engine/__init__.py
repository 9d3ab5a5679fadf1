"""The engine: everything that turns an image file into ranked labels, in three rooms.

    model/     which network is served and what runs it: checkpoint, labels, device, the timm
               recipe, the loader, the model cache, the `Classifier`, and `runtimes/` (PyTorch,
               OpenVINO, the null runtime, CUDA graphs)
    images/    bytes -> pixels, with no torch: decode (the common JPEG's fast decode), what a decode
               may cost, the resize + crop recipe (and its torch twin the engine runs, device_resize)
    serving/   many requests -> batched forward passes: the `Pipeline` types, admission, the
               batcher, the `Engine` that ties them together, its Prometheus figures
    memory.py  the process's heap policy (decoding and serving both follow it)

Edges: images and model import nothing from serving; nothing here imports the web side, the
process boundary (api/remote) or ops (tests/unit/test_layers.py holds all three).
"""
