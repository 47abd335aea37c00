"""The bert experiment's classifiers: DistilBERT with a 2-way sequence-classification head.

- sst2: ``DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))`` from
  random initialisation (~67M parameters: 6 layers, 12 heads, dim 768, vocab 30522).
- qnli: ``DistilBertForSequenceClassification.from_pretrained("distilbert-base-uncased",
  num_labels=2)``: the pretrained encoder with a fresh, randomly initialised
  pre-classifier and 2-way classifier (the checkpoint is a masked-LM one, it has no head).

The model's forward takes the collated batch (``model(**batch)``) and returns
``logits`` (B, 2) and, given ``labels``, ``loss``: the mean cross-entropy in nats.
Random initialisation draws from torch's global generator: seed it before building.
"""
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from harness.errors import UsageError

from .data import check_task

NUM_LABELS = 2
DEFAULT_PRETRAINED = "distilbert-base-uncased"


def build_model(task, pretrained=DEFAULT_PRETRAINED, config_overrides=None):
    """The fp32 classifier for ``task`` (see the module docstring).

    ``config_overrides`` are ``DistilBertConfig`` fields. For sst2 they shape the
    random model (tests use ``dim=32, n_layers=2, n_heads=2, hidden_dim=64``;
    ``vocab_size`` must cover the tokenizer). For qnli they are applied on top of the
    pretrained config, so only fields that keep the weights' shapes make sense
    (``dropout``, ``attention_dropout``, ``seq_classif_dropout``). ``pretrained`` is
    a Hub id or a local directory written by ``save_pretrained``; sst2 ignores it.
    """
    check_task(task)
    overrides = dict(config_overrides or {})
    if "num_labels" in overrides:
        raise UsageError(f"config_overrides may not set num_labels: GLUE {task} has {NUM_LABELS} classes")
    if task == "sst2":
        return DistilBertForSequenceClassification(DistilBertConfig(num_labels=NUM_LABELS, **overrides))
    try:
        model = DistilBertForSequenceClassification.from_pretrained(
            pretrained, num_labels=NUM_LABELS, **overrides)
    except OSError as e:
        raise UsageError(
            f"could not load the pretrained model {pretrained!r}; a Hub id needs network "
            f"access once to fill the local Hugging Face cache, a local path must be a "
            f"directory written by save_pretrained"
        ) from e
    # transformers 5 loads in the checkpoint's dtype; the experiment trains in fp32.
    return model.float()
