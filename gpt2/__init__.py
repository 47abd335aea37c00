"""GPT-2 small (Hugging Face transformers) fine-tuned on WikiText-103 (gpt2/data.py)."""
