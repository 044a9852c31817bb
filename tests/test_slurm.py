"""The Slurm scripts against a real Slurm on this host (slurm/cluster.sh: slurmctld + 2 slurmd).

* preemption: ``slurm/train.sbatch`` (torchrun with one CPU rank: a second rank would add ~30 s
  of start-up on 2 cores; several ranks under Slurm are the multi-node test's part, their
  agreement on the stop step test_resilience's) gets USR1 through
  ``scancel --batch --signal=USR1`` mid-run; the rank checkpoints, the job requeues itself,
  reruns with the same id and ``SLURM_RESTART_COUNT=1``, resumes the same run folder at that
  step and finishes; metrics.jsonl continues step by step.
* multi-node: ``ddp-train submit --nodes 2`` renders ``slurm/train_multinode.sbatch`` and submits
  it; one torchrun on each fake node (n1, n2) meets through the c10d rendezvous: 2 ranks.
* ``ddp-train submit --dry-run`` (no cluster): a runnable script, array sweeps, config errors.

Needs root (the daemons run as root) and Slurm installed or installable with apt-get; skipped
with the reason otherwise. A cluster this module started is stopped afterwards; one that was
already running is left as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, torchrun_env
from ddp_train import checkpoint as ckpt
from ddp_train.demo import ensure_digits
from ddp_train.dist import DistInfo

CLUSTER = os.path.join(ROOT, "slurm", "cluster.sh")
STATE = "/tmp/ddp-train-slurm"  # cluster.sh's default state folder
# A short CPU run: resnet10t on 32 px digits takes ~0.2 s per step on 2 cores. The USR1 comes
# at step 3: the remaining steps leave a faster machine time to deliver it mid-run.
STEPS = 40
TRAIN = [f"train.max_steps={STEPS}", "data.num_workers=0", "eval.every_epoch=false",
         "eval.test_at_end=false", "log.progress=plain", "seed=1"]


def _daemons_running() -> bool:
    pid_file = os.path.join(STATE, "slurmctld.pid")
    try:
        with open(pid_file) as f:
            os.kill(int(f.read().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def cluster():
    """A running local Slurm; yields the environment for sbatch/scontrol and the jobs."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: slurm/cluster.sh starts slurmctld and slurmd")
    installed = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch"))
    if not installed and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    was_running = _daemons_running()
    proc = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if not installed and "apt-get install" in proc.stderr:
            pytest.skip(f"Slurm could not be installed: {proc.stderr.strip()}")
        pytest.fail(f"slurm/cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    env = torchrun_env()
    env.update(SLURM_CONF=os.path.join(STATE, "slurm.conf"),
               TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    yield env
    if not was_running:  # later tests and other users get the machine back as it was
        subprocess.run([CLUSTER, "stop"], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "digits")
    ensure_digits(root, DistInfo())
    return root


def _job(job_id: str, env: dict) -> dict:
    """``scontrol show job`` as a dict of its Key=Value fields ({} once the job is forgotten)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _records(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return "(no file)"


def _wait(job_id: str, env: dict, log: str, until, what: str, timeout: float) -> dict:
    """Poll the job every 0.2 s until ``until(job)`` is true; fail on a failed job or timeout."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = _job(job_id, env)
        if until(job):
            return job
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                   "OUT_OF_MEMORY"):
            break
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=env, capture_output=True)
    pytest.fail(f"job {job_id}: {what} not seen within {timeout:.0f}s (state "
                f"{job.get('JobState')}, restarts {job.get('Restarts')})\n{_read(log)[-5000:]}")


def test_usr1_checkpoints_requeues_and_resumes(cluster, digits, tmp_path):
    env = dict(cluster, GPUS="1", RUN_DIR=str(tmp_path / "run"))
    run_dir, log = env["RUN_DIR"], str(tmp_path / "slurm-%j.out")
    # The script asks for 4 GPUs and 32 cores; sbatch options override #SBATCH lines.
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
         f"--chdir={ROOT}", os.path.join(ROOT, "slurm", "train.sbatch"), "configs/digits.yaml",
         f"data.shards={digits}", *TRAIN],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    log = log.replace("%j", job_id)
    _wait(job_id, env, log, lambda job: any(r.get("step", 0) >= 3 and "loss" in r
                                            for r in _records(run_dir)), "step 3", 120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)

    # Requeued: pending (or already rerunning) with Restarts=1, the checkpoint of the stop on disk.
    job = _wait(job_id, env, log, lambda job: job.get("Restarts") == "1", "the requeue", 90)
    stopped = [r for r in _records(run_dir) if r.get("event") == "preempted"]
    assert len(stopped) == 1, _read(log)[-3000:]
    step = stopped[0]["step"]
    assert 3 <= step < STEPS
    if not any(r.get("event") == "resume" for r in _records(run_dir)):  # not rerun yet
        assert ckpt.read_meta(os.path.join(run_dir, "checkpoints", "last.pt"))["step"] == step

    job = _wait(job_id, env, log, lambda job: job.get("JobState") == "COMPLETED",
                "completion after the requeue", 150)
    assert job["Restarts"] == "1" and job["ExitCode"] == "0:0"
    text = _read(log)
    assert "requeueing job" in text and "restart 1" in text, text[-3000:]

    # One run folder, continued: steps 1..STEPS each once, in order, around one resume record.
    records = _records(run_dir)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert events == [("start", 0), ("preempted", step), ("resume", step), ("start", step),
                      ("end", STEPS)], events
    assert f"resumed from {run_dir}/checkpoints/last.pt at step {step}" in \
        _read(os.path.join(run_dir, "train.log"))
    assert ckpt.read_meta(os.path.join(run_dir, "checkpoints", "last.pt"))["step"] == STEPS


def test_submit_multinode_two_fake_nodes(cluster, digits, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_train", "submit", "--config", "configs/digits.yaml",
         "--nodes", "2", "--gpus", "0", "--cpus-per-task", "1", "--time", "10:00",
         f"data.shards={digits}", f"run.dir={runs}", "run.name=mn", *TRAIN, "train.max_steps=4"],
        env=cluster, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    log = str(runs / "slurm" / f"mn-{job_id}.out")
    job = _wait(job_id, cluster, log, lambda job: job.get("JobState") == "COMPLETED",
                "completion", 120)
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    records = _records(str(runs / f"mn-{job_id}"))
    start = [r for r in records if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2, _read(log)[-3000:]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["event"] == "end"
    assert "rendezvous on n1:" in _read(log)
    # The rendered script was kept for a resubmission.
    assert any(name.endswith(".sbatch") for name in os.listdir(runs / "slurm"))


def _submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddp_train", "submit", *args],
                          capture_output=True, text=True, cwd=ROOT, env=torchrun_env())


def test_submit_dry_run_renders_a_runnable_array_script(tmp_path):
    proc = _submit("--dry-run", "--config", "configs/digits.yaml", "--nodes", "1", "--gpus", "4",
                   "--partition", "gpu", "--account", "proj", "--time", "2-00:00:00",
                   "--sweep", "optim.lr=1e-3,3e-3", "--sweep", "data.mean=[0.5,0.5,0.5],[0,0,0]",
                   "train.epochs=3")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    sbatch = re.findall(r"^#SBATCH (\S+)", script, re.M)
    for opt in ("--nodes=1", "--gpus-per-node=4", "--partition=gpu", "--account=proj",
                "--time=2-00:00:00", "--signal=B:USR1@300", "--requeue", "--array=0-3"):
        assert opt in sbatch, sbatch
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # parses
    # The part before the template body sets the arguments: array task 3 gets the last combo.
    head = script[:script.index("# ---- body:")] + 'printf "%s\\n" "$@"\n'
    args = subprocess.run(["bash", "-c", head], env=dict(os.environ, SLURM_ARRAY_TASK_ID="3"),
                          capture_output=True, text=True, check=True).stdout.split("\n")
    assert args[:4] == [os.path.join(ROOT, "configs", "digits.yaml"), "train.epochs=3",
                        "optim.lr=3e-3", "data.mean=[0,0,0]"], args
    assert "srun --ntasks=1" in script and "scontrol requeue" in script  # train.sbatch's body


def test_submit_rejects_bad_config_before_submitting(tmp_path):
    proc = _submit("--out", str(tmp_path / "x.sbatch"), "optim.lrr=1")
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.sbatch").exists()
    proc = _submit("--dry-run", "--sweep", "optim.lr=1e-3,fast")  # one bad array task
    assert proc.returncode == 2 and "optim.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_array_workers_share_a_study_and_resume_a_preempted_trial(cluster, digits,
                                                                          tmp_path):
    """``ddp-train sweep --slurm --array 2``: two workers (array tasks) pull trials from one
    journal study; task 0 gets USR1 mid-trial, its trial checkpoints, the task requeues, and the
    trial resumes under its own number (by whichever worker asks first). The study ends with
    every trial finished exactly once and none failed."""
    optuna = pytest.importorskip("optuna")
    import yaml

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "arr", "base": "digits", "ranks": 1, "trials": 2,
        "overrides": {"data.shards": digits, "data.num_workers": 0, "eval.every_steps": 10,
                      "eval.every_epoch": False, "eval.test_at_end": False,
                      "checkpoint.every_steps": 5, "log.progress": "plain", "train.max_steps": 30},
        "pruner": {"name": "none"}, "sampler": {"name": "random", "seed": 0},
        "space": {"optim.lr": {"float": [1e-3, 1e-2], "log": True}}}))
    out = str(tmp_path / "sweep")
    proc = subprocess.run([sys.executable, "-m", "ddp_train", "sweep", str(sweep_file), "--slurm",
                           "--array", "2", "--gpus", "0", "--cpus-per-task", "1", "--time",
                           "10:00", "--out", out], env=cluster, capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    array_id = proc.stdout.strip()
    task0 = f"{array_id}_0"
    # Task 0's log names the trial it runs; wait until that trial is a few steps in.
    deadline, trial = time.monotonic() + 150, None
    while time.monotonic() < deadline and trial is None:
        job = _job(task0, cluster)
        found = re.findall(r"trial (\d+) starts", _read(job.get("StdOut", "")))
        if found and any(r.get("step", 0) >= 3 and "loss" in r
                         for r in _records(os.path.join(out, "trials", found[-1]))):
            trial = found[-1]
        time.sleep(0.3)
    assert trial is not None, f"task 0 never got 3 steps into a trial: {_job(task0, cluster)}"
    subprocess.run(["scancel", "--batch", "--signal=USR1", task0], env=cluster, check=True)
    _wait(task0, cluster, _job(task0, cluster).get("StdOut", ""),
          lambda job: job.get("Restarts") == "1", "the requeue of task 0", 90)
    # Both tasks run to the end of the study.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", array_id], env=cluster, capture_output=True,
                               text=True).stdout.strip()
        if not queue:
            break
        time.sleep(1)
    assert not queue, f"array still queued after 300 s:\n{queue}"
    from ddp_train.sweep.study import open_storage

    study = optuna.load_study(study_name="arr",
                              storage=open_storage(os.path.join(out, "study.journal")))
    states = [(t.number, t.state.name) for t in study.trials]
    assert states == [(n, "COMPLETE") for n in range(2)], states
    resumed = study.trials[int(trial)]
    assert resumed.user_attrs["attempts"] == 2 and sorted(resumed.intermediate_values) == \
        [10, 20, 30]
    kinds = [r["event"] for r in _records(os.path.join(out, "trials", trial)) if "event" in r]
    assert kinds[:3] == ["start", "preempted", "resume"] and kinds[-1] == "end", kinds
    logs = [_read(os.path.join(out, "slurm", name)) for name in os.listdir(
        os.path.join(out, "slurm")) if name.endswith(".out")]
    assert len(logs) == 2 and all("ddp-train sweep: trial" in text for text in logs), logs
    assert os.path.exists(os.path.join(out, "report.md"))  # the last worker wrote it
