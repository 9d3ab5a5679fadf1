"""Serving: admitted requests -> batched forward passes -> ranked labels. `pipeline` holds the types
both serving objects share (`Engine` here, `EngineLink` in a front-end process), `admission` the one
queue bound, `batching` the inference thread, `service` the in-process `Engine`."""
