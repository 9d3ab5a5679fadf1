"""The engine: checkpoints, labels, device, preprocessing, runtimes, batching and the serving object.

Nothing here imports a web framework (tests/unit/test_layers.py holds it to that): the HTTP side,
the CLI and the bench all call the engine.
"""
