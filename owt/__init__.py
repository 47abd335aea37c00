"""OpenWebText: nanoGPT's GPT (from nano/) trained on GPT-2 token bins (owt/prepare.py)."""
from harness.token_bins import TokenData

# owt's data, stated once: the commands that prepare it (the paper's folder, smoke.yaml's) and
# the metadata file it writes last (the marker). prepare.py writes by it; train.py passes it to
# harness.token_bins.
DATA = TokenData(prepare="python -m owt.prepare", meta="meta.json",
                 folders={"data/owt-smoke": "python -m owt.prepare --data-files README.md '*/README.md' --out data/owt-smoke"})
