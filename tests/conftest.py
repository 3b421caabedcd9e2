"""Test setup: JAX gets one host device per core before it initialises, and one compilation
cache for the session; shared fixtures."""
import atexit
import contextlib
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same small model and train step, each in a new jit (a new Trainer, a
# new `run.py` process): XLA compiles the same program again, seconds each time on CPU. A
# persistent cache for this session (inherited by the subprocesses) compiles it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxprune-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


@pytest.fixture
def dies_at_epoch_checkpoint():
    """`with dies_at_epoch_checkpoint(n) as tags:` the n-th epoch checkpoint written inside
    raises KeyboardInterrupt instead, after its epoch was logged: a process killed at the
    worst moment. `tags` lists the trainings whose checkpoints were asked for."""
    from jaxprune.train import Journal

    @contextlib.contextmanager
    def dies(n: int):
        real, tags = Journal.save, []

        def save(self, trainer, tag, *args, **kwargs):
            tags.append(tag)
            if len(tags) == n:
                raise KeyboardInterrupt
            return real(self, trainer, tag, *args, **kwargs)
        Journal.save = save
        try:
            yield tags
        finally:
            Journal.save = real
    return dies


# Wall-clock measurements: the only entries of results and metrics an interruption may change.
TIMINGS = ("seconds", "img_s", "latency_ms_before", "latency_ms_after", "latency_ms_border")


@pytest.fixture
def untimed():
    """`untimed(results, out)`: results (or metrics records) without wall-clock entries, the
    run's `out` folder written as `<out>`, to compare runs that live in different folders."""
    def clean(v, out=None):
        if isinstance(v, dict):
            return {k: clean(x, out) for k, x in v.items() if k not in TIMINGS}
        if isinstance(v, list):
            return [clean(x, out) for x in v]
        return v.replace(str(out), "<out>") if out is not None and isinstance(v, str) else v
    return clean
