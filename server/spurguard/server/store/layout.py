"""Where things live under the store root, and the names allowed in those paths.

```
<root>/labels.sqlite3                              labels of every model and fit, their history,
                                                   and the job records (tables labels,
                                                   label_history, jobs; WAL); with
                                                   --labels postgresql://… they are in that
                                                   database instead (store/postgres.py)
<root>/owners/<server id>.lock                     flocked by each running server: whose jobs still
                                                   run (SQLite only)
<root>/models/<name>/<digest>/current.json         {"fit_id": ...}: the fit in use, replaced atomically
<root>/models/<name>/<digest>/fits/<fit_id>/
    settings.json                                  what the fit was started with (resume checks it)
    class_<k>.safetensors                          mean, eigenvalues, vectors, alphas
    class_<k>.json                                 scalars, image ids, tensor checksum: written
                                                   after the tensors, so it marks the class done
    manifest.json                                  written last: its presence commits the fit
    .lock                                          flock of the one open FitWriter
    .scratch/                                      the running fit's feature spill (cleared on resume
                                                   and at start-up)
    shards/                                        a sharded fit's partial statistics until its merge
                                                   (store/shards.py)
<root>/models/<name>/<digest>/transfer.json        {"transfer_id": ...}: the transfer applied (store.transfers)
<root>/models/<name>/<digest>/transfers/<id>/      laid out like a fit folder: settings.json, class_<k>.*,
                                                   manifest.json, .lock, .scratch/
<root>/models/<name>/<digest>/evaluations/<id>.json  one finished Evaluate: request, fit, tables
<root>/models/<name>/<digest>/backbone.onnx        the backbone exported for ONNX Runtime / OpenVINO
```
Names are checked before they become path components, so no request can escape the root.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from spurguard.server.errors import InvalidInput

LABELS_DB = "labels.sqlite3"
CURRENT = "current.json"
CURRENT_TRANSFER = "transfer.json"
SETTINGS = "settings.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
SCRATCH = ".scratch"
OWNERS = "owners"
ONNX_GRAPH = "backbone.onnx"

# Same rule as model.toml names: starts alphanumeric, so never "." or "..".
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CLASS_JSON_RE = re.compile(r"^class_(\d+)\.json$")


def new_id() -> str:
    """A fit, job, evaluation or server id: sortable by start time (to the millisecond), unique
    without coordination."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return value


def short(digest: str) -> str:
    """A digest as people read it in messages."""
    return digest[:12] + "…" if len(digest) > 12 else digest


@dataclass(frozen=True)
class ModelPaths:
    """Paths of one (model name, weights digest): fits of other digests live elsewhere."""

    root: Path
    model: str
    digest: str

    @classmethod
    def of(cls, store_root: Path, model: str, digest: str) -> ModelPaths:
        check_name(model, "model name")
        check_name(digest, "model digest")
        return cls(store_root / "models" / model / digest, model, digest)

    @property
    def fits(self) -> Path:
        return self.root / "fits"

    @property
    def current(self) -> Path:
        return self.root / CURRENT

    def fit(self, fit_id: str) -> Path:
        return self.fits / check_name(fit_id, "fit id")

    @property
    def transfers(self) -> Path:
        return self.root / "transfers"

    def transfer(self, transfer_id: str) -> Path:
        return self.transfers / check_name(transfer_id, "transfer id")

    @property
    def current_transfer(self) -> Path:
        return self.root / CURRENT_TRANSFER

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_GRAPH

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    def evaluation(self, evaluation_id: str) -> Path:
        return self.evaluations / f"{check_name(evaluation_id, 'evaluation id')}.json"


def class_tensors(fit_dir: Path, class_index: int) -> Path:
    return fit_dir / f"class_{class_index}.safetensors"


def class_record(fit_dir: Path, class_index: int) -> Path:
    return fit_dir / f"class_{class_index}.json"


def recorded_classes(fit_dir: Path) -> list[int]:
    """Classes whose JSON record exists, i.e. whose writing finished."""
    found = (_CLASS_JSON_RE.match(p.name) for p in fit_dir.glob("class_*.json"))
    return sorted(int(m.group(1)) for m in found if m)
