"""Tables of the jobs: tidy rows written as CSV and JSON, and Markdown views for the terminal."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Mapping, Sequence

from pspc_jax.files import atomic_write


def write_table(stem: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
  """Writes `rows` as `stem.json` (a list of row objects) and `stem.csv` (header `columns`; floats
  written with `repr`, so they read back exactly), each atomically.

  Raises:
    ValueError: a row has a key that is not in `columns`.
  """
  stem = os.fspath(stem)
  with atomic_write(stem + ".json", "w") as f:
    json.dump(list(rows), f, indent=1)
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
  with atomic_write(stem + ".csv", "w") as f:
    f.write(text.getvalue())


def format_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  """A Markdown table of `rows` (floats to 4 significant digits), for logs and READMEs."""
  def cell(value):
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)
