"""nano: the paper's character-level GPT on Shakespeare.

prepare.py  text -> nanoGPT's shakespeare_char format (train.bin / val.bin / meta.json)
model.py    nanoGPT's GPT (also used by owt)
train.py    one training run
"""
from harness.token_bins import TokenData

# nano's data, stated once: the command that prepares the paper's folder (data/nano) and the
# other folders its configs name (smoke.yaml's, quickstart.yaml's), the
# metadata file written last (the marker), the files of folders prepared by earlier versions
# or by nanoGPT (meta.pkl, read without running code; prepare.json, their source), and what
# the paper config's folder holds (a run there refuses other data). prepare.py writes by it;
# train.py passes it to harness.token_bins.
DATA = TokenData(
    prepare="python -m nano.prepare --source tinyshakespeare",
    meta="meta.json",
    legacy_meta="meta.pkl",
    legacy_provenance="prepare.json",
    paper={"source": "tinyshakespeare", "vocab_size": 65},
    folders={"data/nano-smoke": "python -m nano.prepare --source packaged --plays 2 --out data/nano-smoke",
             "data/nano-packaged": "python -m nano.prepare --source packaged --out data/nano-packaged"},
)
