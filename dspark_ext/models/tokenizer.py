"""The demo's tokenizer: a byte-level BPE trained with the `tokenizers` library on a
corpus every machine has, the Python standard library's own source files.

Files are split into train and held-out by a hash of their path relative to the stdlib
directory, so the split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

EOS = "<|eos|>"


def stdlib_files(held_out_percent: int = 10) -> tuple[list[str], list[str]]:
    """(train, held_out) lists of the stdlib's .py files (not site-packages, not tests),
    sorted; a file is held out when its path hash falls in the first held_out_percent."""
    root = sysconfig.get_paths()["stdlib"]
    train, held_out = [], []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "test", "tests",
                                                            "idlelib", "__pycache__", "lib2to3"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100
            (held_out if bucket < held_out_percent else train).append(path)
    return train, held_out


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(files: list[str], vocab_size: int = 2048):
    """A byte-level BPE (tokenizers.models.BPE with the ByteLevel pre-tokenizer and decoder)
    trained on the files, with EOS as its only special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    return tokenizer


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
