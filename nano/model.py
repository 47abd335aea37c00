"""nanoGPT's GPT language model, in one file.

The model of Karpathy's nanoGPT ``model.py`` (a GPT-2 style decoder-only
transformer): learned token and position embeddings, ``n_layer`` pre-norm blocks
of causal self-attention and a GELU MLP, a final LayerNorm and a linear head
whose weight is tied to the token embedding. Attention runs through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them).

The paper's nano model is ``GPTConfig(block_size=64, vocab_size=65, n_layer=4,
n_head=4, n_embd=128, dropout=0.0, bias=False)`` (804,096 parameters); owt uses
the same class at 6 layers, 8 heads, 512 dim, block 1024, vocab 50304.
Optimizers come from ``optimizers.build``; this file holds no training code.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from harness.config import check_choice, check_count, check_multiple, check_probability


@dataclass
class GPTConfig:
    """The ``model`` section of nano's and owt's configs; a value no model can use is a
    one-line UsageError naming its key (``model.<field>``) when the config is made."""

    block_size: int = 64  # longest context, in tokens
    vocab_size: int = 65  # tokens the embedding and the head cover (None in a config: the data's)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # model width; n_embd / n_head is the width of one head
    dropout: float = 0.0
    bias: bool = False  # biases in the Linear layers and LayerNorms (GPT-2 has them; the paper's runs do not)
    # Which projections into the residual stream get GPT-2's std 0.02 / sqrt(2 n_layer) init:
    # "all" (attention's c_proj and the MLP's c_proj: GPT-2's and nanoGPT's rule) or "mlp" (the MLP's
    # only, the attention projection keeps std 0.02: what the authors' release ran, its attention
    # projection being named `wo`, which its `c_proj.weight` rule misses).
    scaled_init: str = "all"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            check_count(f"model.{name}", getattr(self, name))
        check_multiple("model.n_embd", self.n_embd, "model.n_head", self.n_head)
        check_probability("model.dropout", self.dropout)
        check_choice("model.scaled_init", self.scaled_init, tuple(SCALED_INIT))


# model.scaled_init -> the parameter names (suffixes) that get the scaled init.
SCALED_INIT = {"all": ("attn.c_proj.weight", "mlp.c_proj.weight"), "mlp": ("mlp.c_proj.weight",)}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (``nn.LayerNorm`` has no ``bias=False`` before torch 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    def __init__(self, config):
        super().__init__()
        # key, query, value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head size)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # softmax(q k^T / sqrt(head size) + causal mask) v, fused
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # checked when it was made (GPTConfig.__post_init__)

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the head reuses the token embedding, one Parameter for both.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream: each block adds two
        # of them to the stream, so std 0.02 / sqrt(2 n_layer) keeps its variance from growing with depth.
        # (scaled_init "mlp" applies it to the MLP's projection only, as the authors' release did.)
        for name, p in self.named_parameters():
            if name.endswith(SCALED_INIT[config.scaled_init]):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Number of parameters; with ``non_embedding`` the position embedding is left out.

        The token embedding stays counted: it is the head's weight too (tied).
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None):
        """Logits and loss for token ids ``idx`` of shape (B, T), T <= block_size.

        With ``targets`` (B, T): logits (B, T, vocab_size) and the mean cross
        entropy over all B*T positions (nats per token; target -1 is ignored).
        Without: logits (B, 1, vocab_size) for the last position only, and loss None.
        """
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)

        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            # generation needs only the next token: skip the head on the other positions
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def estimate_flops_per_iter(self, fwdbwd_per_iter):
        """Model FLOPs of one training iteration (forward + backward), as nanoGPT's ``estimate_mfu``.

        ``fwdbwd_per_iter`` is the number of block_size-token sequences one process
        feeds per iteration: its micro-batch x gradient-accumulation steps, i.e.
        ``train.batch_size`` (the global batch) / the number of ranks. Per token the
        PaLM paper (Chowdhery et al. 2022, appendix B) counts 6 N for the
        weights (N = non-embedding parameters; 2 FLOPs per multiply-add, forward
        plus twice that backward) and 12 L H Q T for attention (L layers, H
        heads, Q head size, T = block_size). Divide by seconds per iteration and
        a device's peak FLOP/s for the MFU.
        """
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; call in eval mode.

        Each step feeds the last block_size tokens, divides the logits by
        ``temperature`` and samples from the softmax, restricted to the ``top_k``
        most likely tokens when given.
        """
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
