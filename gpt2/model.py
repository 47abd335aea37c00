"""The gpt2 experiment's model: Hugging Face transformers' ``GPT2LMHeadModel``.

- ``pretrained``: ``GPT2LMHeadModel.from_pretrained("openai-community/gpt2")``, GPT-2 small
  (12 layers, 12 heads, width 768, 1024 positions, vocab 50257, dropout 0.1; 124,439,808
  parameters, the head tied to the token embedding), or any directory written by
  ``save_pretrained``.
- ``from_scratch``: a randomly initialised ``GPT2Config(n_layer, n_head, n_embd, ...)``
  (offline tests, smoke runs).

``model(input_ids=x, labels=x)`` returns ``loss``: the mean cross entropy (nats per
token) of predicting token t+1 from tokens <= t, over the T-1 predicted positions
of each sequence (the model shifts the labels itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers import GPT2Config, GPT2LMHeadModel

from harness.config import check_count, check_multiple, check_probability
from harness.errors import UsageError
from harness.gpt2_tokenizer import HUB_GPT2, VOCAB_SIZE

DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section of gpt2's configs (``build_model``'s arguments but the data's
    ``n_positions`` and ``vocab_size``); a value no model can use is a one-line UsageError
    naming its key when the config is made."""

    pretrained: str = HUB_GPT2
    from_scratch: bool = False
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: Optional[float] = None  # None: the config's (0.1 for GPT-2)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd"):
            check_count(f"model.{name}", getattr(self, name))
        check_multiple("model.n_embd", self.n_embd, "model.n_head", self.n_head)
        check_probability("model.dropout", self.dropout)


def build_model(cfg: ModelConfig, n_positions: int = 1024, vocab_size: int = VOCAB_SIZE) -> GPT2LMHeadModel:
    """The fp32 GPT-2 language model of ``cfg`` (see the module docstring).

    ``cfg.n_layer``, ``n_head``, ``n_embd``, and ``n_positions`` and ``vocab_size`` shape a
    ``from_scratch`` model only; a pretrained one has its checkpoint's shape.
    ``cfg.dropout`` (None: the config's, 0.1 for GPT-2) sets the residual, embedding and
    attention dropout rates of either. Random initialisation draws from torch's global
    generator: seed it before building.
    """
    rates = {} if cfg.dropout is None else {name: float(cfg.dropout) for name in DROPOUT_FIELDS}
    pretrained = cfg.pretrained
    if cfg.from_scratch:
        config = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=n_positions,
                            vocab_size=vocab_size, **rates)
        model = GPT2LMHeadModel(config)
    else:
        # Run from the repository root, "gpt2" is also this experiment's folder gpt2/, which
        # from_pretrained would take for a local checkpoint; the full hub id is unambiguous.
        name = HUB_GPT2 if pretrained in ("gpt2", HUB_GPT2) else str(pretrained)
        try:
            model = GPT2LMHeadModel.from_pretrained(name, **rates)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"could not load the pretrained model {name!r}: a hub id needs network access once to fill "
                "the Hugging Face cache, a local path must be a directory written by save_pretrained"
            ) from e
    # Training never reuses attention keys/values across calls; building the cache costs memory.
    model.config.use_cache = False
    # transformers picks the loss from the class name, which "GPT2LMHeadModel" does not match
    # (it warns, then uses this same shifted cross entropy): name it.
    model.loss_type = "ForCausalLM"
    return model.float()  # transformers 5 loads in the checkpoint's dtype; the weights train in fp32


def flops_per_token(model: GPT2LMHeadModel, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward) at sequence length ``seq_len``.

    The PaLM count (Chowdhery et al. 2022, appendix B), as nano's GPT: ``6 N`` for the
    weights, with N the parameters less the position embedding (the token embedding
    stays: it is also the output head's weight), plus ``12 L H Q T`` for attention
    (L layers, H heads, Q head width, T = ``seq_len``).
    """
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len
