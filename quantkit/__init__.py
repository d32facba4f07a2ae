"""quantkit: compress Hugging Face causal language models, measure what it cost, serve them."""

__version__ = "0.1.0"
