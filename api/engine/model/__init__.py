"""The model: which network is served and what runs it. `loader.load_classifier` builds a complete
`Classifier`; `served.Served` is what answers name (importable without torch, for front-ends)."""
