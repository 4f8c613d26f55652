"""tailjax: judge and train language models by the shape of their per-token loss."""

__version__ = "0.1.0"
