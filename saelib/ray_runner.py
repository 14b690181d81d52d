"""A study's runs as tasks on a Ray cluster (``python -m saelib.study params/<study> --ray ADDRESS``).

Each run is one Ray task executing the same :func:`saelib.study.run_notebooks` that the local pool runs, with the
resources its runner settings declare (``num_cpus``, ``num_gpus``: 1 for a run on ``cuda`` unless set), so stamps,
skipping, resuming and failures behave as they do locally. Tasks ``chdir`` to the driver's working directory: the
repository, ``runs/`` and the activation caches (``$SAELIB_CACHE``) must sit on a filesystem every node shares, and
every node needs the same environment (``make setup``). Nothing is submitted until the address answers and the
cluster holds the resources one run asks for.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

from saelib.config import ConfigError

CONNECT_TIMEOUT_S = 5.0


def _task(root: str, run, notebooks, settings, threads: int):
    from saelib.study import run_notebooks

    os.chdir(root)
    return run_notebooks(run, notebooks, settings, threads)


def _check_reachable(address: str) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection within seconds: ``ray.init``
    itself retries an unreachable one for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray: expected 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"ray: no Ray cluster answers at {address!r} ({err}); start one with `ray start --head` "
                          "or run without --ray") from None


def failure_message(err: Exception) -> str:
    """One line for the summary: what the task raised (a RayTaskError wraps it; its own text is a coloured header)."""
    cause = getattr(err, "cause", None)
    return (f"{type(cause).__name__}: {cause}" if cause is not None else str(err).splitlines()[0])[:300]


class RayPool:
    """Connects to the cluster at ``settings.ray``, checks its resources against one run's, then runs ``todo``."""

    def __init__(self, settings, todo: list):
        import ray

        self.ray, self.todo = ray, todo
        _check_reachable(settings.ray)
        try:
            ray.init(address=settings.ray, log_to_driver=False, ignore_reinit_error=True,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"ray: could not connect to the Ray cluster at {settings.ray!r}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        self.settings = settings
        self.threads = max(1, int(settings.num_cpus or settings.threads or 1))
        # a task runs on one node: what counts is the largest node, not the cluster's sum
        largest = {name: max((n["Resources"].get(name, 0) for n in ray.nodes() if n["Alive"]), default=0)
                   for name in ("CPU", "GPU")}
        self.resources = {}
        for run, _ in todo:
            gpus = settings.num_gpus if settings.num_gpus is not None else float(run.cfg.device.startswith("cuda"))
            cpus = settings.num_cpus if settings.num_cpus is not None else self.threads
            for name, need in (("GPU", gpus), ("CPU", cpus)):
                if need > largest[name]:
                    ray.shutdown()
                    raise ConfigError(f"num_{name.lower()}s: run {run.name} asks for {need:g} {name}(s), the "
                                      f"largest node of the Ray cluster at {settings.ray!r} has {largest[name]:g}")
            self.resources[run.name] = {"num_cpus": cpus, "num_gpus": gpus}

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.ray.shutdown()

    def results(self) -> Iterator[tuple]:
        """``(run, (status, error, minutes))`` as each task ends; a task Ray itself lost counts as failed."""
        ray = self.ray
        task = ray.remote(_task)
        root = str(Path.cwd())
        refs = {task.options(name=f"saelib:{run.name}", max_retries=0, **self.resources[run.name])
                .remote(root, run, notebooks, self.settings, self.threads): run for run, notebooks in self.todo}
        try:
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                run = refs.pop(ref)
                try:
                    yield run, ray.get(ref)
                except ray.exceptions.RayError as err:
                    yield run, ("failed in ray", failure_message(err), 0.0)
        finally:
            for ref in refs:  # interrupted: leave nothing running on the cluster
                ray.cancel(ref, force=True)
