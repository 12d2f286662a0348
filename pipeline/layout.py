"""Where each phase reads and writes under the output folder (the layout users rely on)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from transforms.write_output import join_path, write_atomically

PHASES = ("fetch", "decide", "write")


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str

    def _dir(self, name: str) -> str:
        return join_path(self.root, name)

    @property
    def features(self) -> str:
        return self._dir("features")

    @property
    def features_staging(self) -> str:
        """Where `--retry-failed` writes the merged features before swapping them into place."""
        return self._dir("features.staging")

    @property
    def raw_shards(self) -> str:
        return self._dir("raw")

    @property
    def decisions(self) -> str:
        return self._dir("decisions")

    @property
    def shards(self) -> str:
        return self._dir("shards")

    @property
    def ledger(self) -> str:
        return self._dir("ledger")

    @property
    def report(self) -> str:
        return self._dir("report")

    @property
    def run_info(self) -> str:
        return self._dir("run")

    def work(self, phase: str) -> str:
        """A phase's temporary files (columnar shuffles), removed when the phase ends."""
        return join_path(self.root, "work", phase)

    def features_glob(self) -> str:
        return join_path(self.features, "*.parquet")

    def decisions_glob(self) -> str:
        return join_path(self.decisions, "*.parquet")

    def ledger_glob(self) -> str:
        return join_path(self.ledger, "*.parquet")

    def phase_marker(self, phase: str) -> str:
        return join_path(self.run_info, f"{phase}.json")

    def write_phase_info(self, phase: str, info: dict) -> None:
        info = dict(info, phase=phase, finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_atomically(self.phase_marker(phase), json.dumps(info, indent=2, sort_keys=True).encode())

    def read_phase_info(self, phase: str) -> Optional[dict]:
        path = self.phase_marker(phase)
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as handle:
            return json.loads(handle.read().decode())

    def replace(self, directory: str, staging: str) -> None:
        """Swap a fully written staging folder into place."""
        self.clear(directory)
        FileSystems.rename([staging], [directory])

    def clear(self, directory: str) -> None:
        """Remove a previous output (folder or file) so stale files never mix with new ones."""
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
