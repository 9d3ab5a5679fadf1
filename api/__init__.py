"""cat-breeds-api: serve a fine-tuned timm image classifier over HTTP."""

__version__ = "0.1.0"
