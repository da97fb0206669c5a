"""The newest benchmark figures, in one flat file: ``bench/results/latest.json``.

Each benchmark adds its figures to what the file holds (a run of one of them
keeps the other's figures), with the date and the machine's core count.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib

LATEST = pathlib.Path(__file__).parent / "results" / "latest.json"


def record(figures: dict, path: pathlib.Path = LATEST) -> None:
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        held = {}
    held.update({name: round(value, 3) if isinstance(value, float) else value for name, value in figures.items()})
    held.update(cpu_count=os.cpu_count(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(held.items())), indent=2) + "\n")
    print(f"figures written to {path}")
