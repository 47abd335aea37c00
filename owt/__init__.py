"""OpenWebText: nanoGPT's GPT (from nano/) trained on GPT-2 token bins (owt/prepare.py)."""
