"""codex-forge: the thin package the stage notebooks import (one module per stage + shared helpers)."""
