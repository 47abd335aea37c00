"""GPT-2 small (Hugging Face transformers) fine-tuned on WikiText-103 (gpt2/data.py)."""

# The command that downloads, tokenizes and caches the data.
PREPARE = "python -m gpt2.data"
