"""nano: the paper's character-level GPT on Shakespeare.

prepare.py  text -> nanoGPT's shakespeare_char format (train.bin / val.bin / meta.json)
model.py    nanoGPT's GPT (also used by owt)
train.py    one training run
"""

# The command that prepares the paper's data, and the file it writes last (harness/token_bins.py).
PREPARE = "python -m nano.prepare --source tinyshakespeare"
MARKER = "meta.json"
# What the paper config's data folder (data/nano) holds: a run there refuses other data
# (harness.token_bins.expect_paper_data).
PAPER_DATA = {"source": "tinyshakespeare", "vocab_size": 65}
