"""Stage 05's facts that serving, releases, the report and the benchmarks read: the parity gate per backend, the
backends it skipped and why, the index's default backend, the machine its speeds were measured on, and the names and
licences a release's model card states. Kept apart from lib/export.py, which imports torch: the server and the
release commands read these without it."""
from __future__ import annotations

from dataclasses import dataclass, field

from lib.io import StageFacts


@dataclass(frozen=True)
class ExportFacts(StageFacts):
    """Written into stage 05's metrics.json (as_metrics), read back with read(); nothing else parses those keys."""

    backends: dict = field(default_factory=dict)  # backend → its gate: passed, min_cosine, ndcg delta, items/s, …
    default_backend: str = "torch-fp32"  # the saved index's: the fastest that passed
    skipped_backends: dict = field(default_factory=dict)  # backend → why it was not tried on this machine
    machine: dict = field(default_factory=dict)  # where the speeds were measured (CPU model, ISA flags, cores)
    model_card: dict = field(default_factory=dict)  # base_model, model_license, data_license

    def passed(self, backend: str) -> bool:
        """Whether the parity gate passed this backend."""
        return bool(self.backends.get(backend, {}).get("passed"))
