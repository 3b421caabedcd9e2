"""Multi-process runs: `run.py --coordinator` on localhost (CPU, gloo) against one process.

Two processes with one host device each see the same global batches as one process
with two devices (each process loads every other row of a global batch), so a short
EASIER run must end with the same results up to float rounding; only process 0 may
write into the run folder.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxprune import distributed
from jaxprune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# The demo shrunk hard: two optimizer steps per round. The two runs sum their reductions
# in another order; training amplifies that rounding fast (1e-3 after ten steps), so the
# runs are kept short enough to compare closely.
OVERRIDES = ["model.options.width=8", "train.epochs=1", "train.milestones=[]", "train.lr=0.01",
             "method.max_rounds=1", "method.pretrain_epochs=0", "method.latency=false",
             "method.merge_cost=none", "data.name=digits", "data.batch_size=512", "name=mh"]

# Runs run.py with an audit hook that records every file-system write under the run
# folder (open for writing, mkdir, rename, remove) into a JSON list at exit.
LAUNCH = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    watch, log = os.environ["MH_WATCH"], os.environ["MH_WRITES"]
    writes = []
    def hook(event, args):
        if event == "open":
            if not (isinstance(args[1], str) and set(args[1]) & set("wax+")
                    or args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
        elif event not in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
            return
        if isinstance(args[0], (str, os.PathLike)):
            path = os.path.abspath(os.fspath(args[0]))
            if path.startswith(watch):
                writes.append(f"{event} {path}")
    sys.addaudithook(hook)
    atexit.register(lambda: open(log, "w").write(json.dumps(writes)))
    sys.argv = ["run.py", *sys.argv[1:]]
    runpy.run_path("run.py", run_name="__main__")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, devices: int, writes: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MH_WATCH": str(out) + os.sep, "MH_WRITES": str(writes),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [sys.executable, "-c", LAUNCH, "--out", str(out), *flags]
    for o in OVERRIDES:
        args += ["--set", o]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = _start(tmp_path / "one", 2, tmp_path / "one.json")
    _finish(single)
    port = _free_port()
    procs = [_start(tmp_path / "two", 1, tmp_path / f"two_{i}.json", "--coordinator",
                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i))
             for i in range(2)]
    for p in procs:
        _finish(p)

    one = json.loads((tmp_path / "one" / "mh" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "mh" / "results.json").read_text())
    assert len(one["rounds"]) == len(two["rounds"]) == 2
    for a, b in zip(one["rounds"], two["rounds"]):
        assert a["linearized"] == b["linearized"]
        for key in ("train_loss", "val_loss", "test_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, err_msg=key)
        for key in ("train_acc", "val_acc", "test_acc"):  # near chance: a few examples flip
            assert abs(a[key] - b[key]) <= 1.2, (key, a[key], b[key])  # 3 of the 270 val
        assert a["entropy"].keys() == b["entropy"].keys()
        np.testing.assert_allclose(list(a["entropy"].values()), list(b["entropy"].values()),
                                   atol=1e-3)
    assert one["selected"]["linearized"] == two["selected"]["linearized"]

    main, other = (json.loads((tmp_path / f"two_{i}.json").read_text()) for i in range(2))
    run_dir = str(tmp_path / "two" / "mh")
    written = {w.split(" ", 1)[1] for w in main}
    for name in ("config.yaml", "results.json", "report.md", "metrics.jsonl", "checkpoints",
                 "export"):
        assert any(p.startswith(f"{run_dir}/{name}") for p in written), name
    # Process 1 writes only its part of orbax's collective checkpoint writes (its shards'
    # metadata), inside the run's checkpoints; everything else is process 0's.
    assert all(w.split(" ", 1)[1].startswith(f"{run_dir}/checkpoints/") for w in other), other[:5]


def test_broadcast_json_gives_every_process_process_0s_data(tmp_path):
    """What a multi-process layermerge run does with the latency table only process 0
    measured: every process gets it, exactly (floats included)."""
    port = _free_port()
    script = textwrap.dedent(f"""
        import json, sys
        from jaxprune import distributed
        i = int(sys.argv[1])
        distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=i)
        got = distributed.broadcast_json({{"ms": {{"0,1": 0.1 + i, "0,2": 1 / 3}}, "who": i}}
                                         if i == 0 else None)
        print("GOT" + json.dumps(got))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-2000:]
        got = json.loads(next(line for line in out.splitlines() if line.startswith("GOT"))[3:])
        assert got == {"ms": {"0,1": 0.1, "0,2": 1 / 3}, "who": 0}
    assert distributed.broadcast_json({"one": "process"}) == {"one": "process"}


def test_initialize_without_a_cluster_is_a_no_op(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.cluster_environment() is None
    assert distributed.initialize() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task step is an ordinary run
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.delenv("SLURM_STEP_NODELIST")  # a batch script's shell, outside srun
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    assert distributed.cluster_environment() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
    assert distributed.cluster_environment() == "tpu pod"


@pytest.mark.parametrize("args, words", [
    (("127.0.0.1:1234", None, None), "go together"),
    (("localhost", 2, 0), "HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), "--process-id"),
    (("127.0.0.1:1234", 0, 0), "--num-processes"),
])
def test_initialize_refuses_bad_flags(args, words):
    with pytest.raises(UserError, match=words):
        distributed.initialize(*args)


def test_one_process_flags_start_nothing():
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is None
