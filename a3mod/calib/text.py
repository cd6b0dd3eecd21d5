"""Calibration text and token windows: WikiText-2 from the assets, a text file, or a Hugging Face dataset."""
from __future__ import annotations

import io
import random
import stat
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CalibrationError
from ..paths import dataset_file
from .sources import dataset_text, is_dataset_source

_WIKITEXT_ESCAPES = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def text_file(path) -> str:
    """The UTF-8 text of a regular file; CalibrationError naming the file for anything else (a binary or UTF-16
    file, a FIFO or device, an unreadable path)."""
    p = Path(path)
    try:
        if not stat.S_ISREG(p.stat().st_mode):
            raise CalibrationError(f"text source {str(p)!r} is not a regular file")
        data = p.read_bytes()
    except OSError as e:
        raise CalibrationError(f"text source {str(p)!r} cannot be read: {e.strerror or e}") from None
    if b"\x00" in data[:1 << 16]:
        raise CalibrationError(f"text source {str(p)!r} holds NUL bytes: a binary file (or UTF-16), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"text source {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                               f"convert it, e.g. iconv -t UTF-8") from None


def read_text(source) -> str:
    """Text of a calibration / evaluation source: 'wikitext2' (assets), 'wikitext2-test', a file path, or a
    Hugging Face dataset (a `datasets.Dataset`, a save_to_disk folder, 'hf:NAME[:CONFIG][@SPLIT][#COLUMN]';
    a3mod.calib.sources).

    Rows are joined with blank lines ("\n\n".join(rows), rows keeping their "\n", as in HF `datasets`).
    The tokenized WikiText-2 split used for 'wikitext2' has its @-@ / @,@ / @.@ escapes undone.
    """
    if is_dataset_source(source):
        return dataset_text(source)
    lines = io.StringIO(text_file(dataset_file(source)), newline="").readlines()    # as open(newline="") splits
    rows = [l if l.strip() else "" for l in lines]
    text = "\n\n".join(rows)
    if source == "wikitext2":
        for k, v in _WIKITEXT_ESCAPES.items():
            text = text.replace(k, v)
    return text


def calibration_data(tokenizer, source="wikitext2", n_samples: int = 128, seq_len: int = 2048,
                     seed: int = 0) -> Tensor:
    """`n_samples` random windows of `seq_len` tokens from a local text source, (n_samples, seq_len) int64.

    `source`: 'wikitext2' (WikiText-2 in the assets dir, the split staged for calibration), a text file path, or a
    Hugging Face dataset (see `read_text`).
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"n_samples={n_samples}, seq_len={seq_len}: need n_samples >= 1 and seq_len >= 2")
    ids = tokenizer(read_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seq_len:
        raise CalibrationError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than "
                               f"seq_len={seq_len}; use a shorter seq_len or more text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len + 1) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])
