import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The experiment folders are run from the repo root and are not installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The tests' models are tiny: one thread each is fastest, and subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
