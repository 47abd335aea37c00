"""GLUE experiments: DistilBERT from random init on SST-2, pretrained DistilBERT fine-tuned on QNLI.

``bert.data`` loads, splits (70/15/15, seed 42), tokenizes and caches the GLUE
task; ``bert.model`` builds the classifier; ``bert.train`` runs it through the harness.
"""

# The GLUE tasks, in the paper's order (each has configs/<task>/).
TASKS = ("sst2", "qnli")
# The command that downloads, splits and tokenizes a task's data.
PREPARE = "python -m bert.prepare --task {task}"
