"""nano: the paper's character-level GPT on Shakespeare.

prepare.py  text -> nanoGPT's shakespeare_char format (train.bin / val.bin / meta.pkl)
model.py    nanoGPT's GPT (also used by owt)
train.py    one training run
"""

# The command that prepares the paper's data, and the file it writes last (harness/token_bins.py).
PREPARE = "python -m nano.prepare --source tinyshakespeare"
MARKER = "meta.pkl"
