"""auditui: audit language models with sparse autoencoders, from the terminal."""

__version__ = "0.1.0"
