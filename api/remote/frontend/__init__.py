"""The front-end half of the engine boundary: runs in every HTTP front-end and imports no torch,
timm or OpenVINO (tests/unit/test_layers.py proves it)."""
