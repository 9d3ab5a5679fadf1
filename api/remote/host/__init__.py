"""The engine half of the boundary: the engine process, which holds the model (torch, OpenVINO)."""
