"""sftlab: supervised fine-tuning of LLMs, correct by construction."""

__version__ = "0.1.0"
