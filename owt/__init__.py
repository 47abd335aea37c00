"""OpenWebText: nanoGPT's GPT (from nano/) trained on GPT-2 token bins (owt/prepare.py)."""

# The command that prepares the data, and the file it writes last (harness/token_bins.py).
PREPARE = "python -m owt.prepare"
MARKER = "meta.json"
