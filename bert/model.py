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
from dataclasses import dataclass
from typing import Optional

from transformers import DistilBertConfig, DistilBertForSequenceClassification

from harness.config import check_count, check_multiple, check_probability
from harness.errors import UsageError

from .data import check_task

NUM_LABELS = 2
DEFAULT_PRETRAINED = "distilbert-base-uncased"


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section of bert's configs: ``pretrained`` (qnli's weights) and
    ``DistilBertConfig`` fields, None meaning DistilBERT's default (the pretrained config's,
    for qnli). A value no model can use is a one-line UsageError naming its key when the
    config is made."""

    pretrained: Optional[str] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    hidden_dim: Optional[int] = None
    dropout: Optional[float] = None
    attention_dropout: Optional[float] = None
    seq_classif_dropout: Optional[float] = None

    def __post_init__(self):
        for name in ("vocab_size", "max_position_embeddings", "dim", "n_layers", "n_heads", "hidden_dim"):
            check_count(f"model.{name}", getattr(self, name))
        check_multiple("model.dim", self.dim, "model.n_heads", self.n_heads)
        for name in ("dropout", "attention_dropout", "seq_classif_dropout"):
            check_probability(f"model.{name}", getattr(self, name))


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
