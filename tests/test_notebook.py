"""The quickstart notebook (docs/quickstart.ipynb) runs top to bottom on the embedded digits."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "docs" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env_flags = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  try:
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    if env_flags is None:
      os.environ.pop("XLA_FLAGS")
    else:
      os.environ["XLA_FLAGS"] = env_flags
  outputs = [cell for cell in notebook.cells if cell.cell_type == "code"]
  errors = [out for cell in outputs for out in cell.get("outputs", []) if out.output_type == "error"]
  assert not errors
  # The sharded call reports 8 devices and agrees with the single-device denoiser.
  shard_cell = next(cell for cell in outputs if "pj.shard(" in cell.source)
  text = shard_cell.outputs[-1]["data"]["text/plain"]
  devices, gap = eval(text)  # noqa: S307 - our own notebook's (int, float) output
  assert devices == 8 and gap < 1e-5
  grad_cell = next(cell for cell in outputs if "jax.grad" in cell.source)
  dsigma, central = eval(grad_cell.outputs[-1]["data"]["text/plain"])  # noqa: S307
  assert abs(dsigma - central) <= 1e-2 * max(1.0, abs(central))
