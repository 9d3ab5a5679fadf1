"""What runs the forward pass: the `Runtime` protocol and how one is chosen (`base`), PyTorch
(`torch_runtime`, with `cuda_graphs`), OpenVINO (`openvino_runtime`) and the null runtime."""
