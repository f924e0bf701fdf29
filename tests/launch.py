"""Starts a program as K cooperating JAX processes on this machine (loopback only), for the tests.

`run_processes(argv, num_processes=2, devices_per_process=1)` starts K copies of `argv` with
JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port> (the coordinator binds to that loopback address
only), JAX_NUM_PROCESSES=K and JAX_PROCESS_ID=i, on the CPU with `devices_per_process` simulated
devices each and Gloo CPU collectives, waits for all of them within a time limit, and returns their
exit codes and output. The programs join the run themselves (`pspc_jax.distributed.initialize`, or
`--multihost` at the command line).

A failed process is one that exits with a non-zero status or prints a Python traceback (a process
that raised still waits in JAX's shutdown barrier for its peers). Once one fails, or time runs out,
all still running are killed (a peer would otherwise wait at its next collective until JAX's own,
much longer, timeouts), and with `check=True` an AssertionError shows every process's exit code and
stderr.

XLA compiles without backend optimisation (`FAST_COMPILE`: the tests' tiny programs compile several
times faster), so compare runs made through this module with each other, not with the test process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"
_TRACEBACK = "Traceback (most recent call last)"


@dataclasses.dataclass
class ProcessResult:
  """One process's exit code (negative: killed by that signal), stdout and stderr."""
  process_id: int
  returncode: int
  stdout: str
  stderr: str


def python(*args: str) -> list[str]:
  """[this Python interpreter, *args]."""
  return [sys.executable, *args]


def free_port() -> int:
  """A TCP port of 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                extra: dict | None = None) -> dict:
  """The environment of process `process_id`: this one's, plus the repository and the tests on the
  Python path, CPU only with `devices_per_process` devices, Gloo collectives and the coordinator."""
  address = f"127.0.0.1:{port}"
  xla_flags = f"--xla_force_host_platform_device_count={devices_per_process} {FAST_COMPILE}"
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
              JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", XLA_FLAGS=xla_flags,
              JAX_COORDINATOR_ADDRESS=address, JAX_COORDINATOR_BIND_ADDRESS=address,
              JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id), **(extra or {}))


def run_processes(argv: list[str], *, num_processes: int = 2, devices_per_process: int = 1,
                  timeout: float = 120.0, env: dict | None = None,
                  cwd: str | Sequence[str] | None = None,
                  check: bool = True) -> list[ProcessResult]:
  """Runs `argv` as `num_processes` JAX processes of one run and waits for all of them.

  Args:
    argv: the command, e.g. python(os.path.join(REPO, "bin", "train"), "--multihost", ...).
    num_processes: K ≥ 1.
    devices_per_process: simulated CPU devices per process.
    timeout: seconds for the whole run, from the start of the first process.
    env: extra environment variables for every process.
    cwd: the working directory of every process, or one per process (relative output paths then
      show which process wrote what); default: the repository.
    check: raise unless every process exits with status 0.

  Returns:
    One `ProcessResult` per process, in process order.

  Raises:
    AssertionError (with `check`): a process failed or the run timed out; the message holds every
      process's exit code and the end of its stderr.
  """
  port = free_port()
  cwds = [cwd or REPO] * num_processes if cwd is None or isinstance(cwd, str) else list(cwd)
  with tempfile.TemporaryDirectory(prefix="launch-") as logs:
    paths = [(os.path.join(logs, f"{i}.out"), os.path.join(logs, f"{i}.err"))
             for i in range(num_processes)]
    procs = []
    for i, (out_path, err_path) in enumerate(paths):
      with open(out_path, "w") as out, open(err_path, "w") as err:
        procs.append(subprocess.Popen(
            argv, stdout=out, stderr=err, cwd=cwds[i],
            env=process_env(i, num_processes, port, devices_per_process, env)))
    timed_out = _wait_all(procs, [err_path for _, err_path in paths], time.monotonic() + timeout)
    results = [ProcessResult(i, proc.returncode, _read(out_path), _read(err_path))
               for i, (proc, (out_path, err_path)) in enumerate(zip(procs, paths))]
  if check and (timed_out or any(r.returncode != 0 for r in results)):
    raise AssertionError(_failure_report(results, timed_out, timeout))
  return results


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _wait_all(procs: list[subprocess.Popen], stderr_paths: list[str], deadline: float) -> bool:
  """Waits until every process has exited; kills all that still run once one fails (a non-zero exit
  status or a traceback in its stderr file) or at `deadline`. Returns whether the run was cut off by
  the deadline."""
  while any(p.poll() is None for p in procs):
    failed = (any(p.returncode not in (None, 0) for p in procs)
              or any(_TRACEBACK in _read(path) for path in stderr_paths))
    late = time.monotonic() > deadline
    if failed or late:
      for p in procs:
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()
      return late and not failed
    time.sleep(0.05)
  return False


def _failure_report(results: list[ProcessResult], timed_out: bool, timeout: float) -> str:
  head = f"timed out after {timeout:.0f}s" if timed_out else "a process failed"
  parts = [f"{len(results)}-process run: {head}"]
  for r in results:
    parts.append(f"--- process {r.process_id}: exit code {r.returncode}; stderr (end):\n"
                 f"{r.stderr[-4000:]}")
  return "\n".join(parts)
