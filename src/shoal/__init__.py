"""shoal: run large language models on a shoal of ordinary machines as if they were one computer."""

__version__ = "0.1.0"
