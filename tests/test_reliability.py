"""Long-run reliability through main.py: kills, preemption, multi-host, damaged checkpoints.

Runs that must be killed or span several processes are real `main.py`
subprocesses on the tests' tiny config (tests/configs/tiny.py). A wrapper
can pause the input stream before a chosen step, say so on stdout and wait for a line on
stdin, so that a signal lands at a known step however loaded the machine is: the tests wait
on events the run announces (that line, a committed checkpoint), never on a clock.
"""

import json
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from seg_jax import train
from seg_jax.data import pipeline
from tests.conftest import reserved_port
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wall-clock quantities, and the per-process start marker, differ between any two runs.
TIMING_KEYS = ("steps_per_sec", "uptime", "compile_seconds", "wall_seconds", "num_params")

# main.py; with PAUSE_BEFORE_STEP=N, before handing out step N's batch (steps up to N - 1
# done and logged) it prints "PAUSED N" and waits for a line on stdin other than "ping", answering
# each "ping" with "PONG" (Python runs a signal's handler before the next line of Python after the
# read, so a PONG means every signal sent before the ping has been handled).
_MAIN = """
import os, sys
sys.argv = ["main.py"] + sys.argv[1:]
import main
from seg_jax.data import pipeline
real, pause = pipeline.train_batches, int(os.environ.get("PAUSE_BEFORE_STEP", "0"))
def paused(*args, **kwargs):
  for step, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
    if step == pause:
      print("PAUSED", step, flush=True)
      while sys.stdin.readline() == "ping\\n":  # a signal meanwhile is handled, the read goes on
        print("PONG", flush=True)
    yield batch
pipeline.train_batches = paused
from absl import app
app.run(main.main, flags_parser=main._parse_flags)
"""


def _command(data_dir, workdir, cache_dir, *extra):
  return [sys.executable, "-c", _MAIN, f"--config={REPO}/tests/configs/tiny.py:{data_dir}",
          f"--workdir={workdir}", "--config.num_train_steps=30", "--config.log_every_steps=1",
          "--config.eval_every_steps=15", f"--config.compilation_cache_dir={cache_dir}", *extra]


def _env(devices=1, pause_before_step=0):
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
          "PAUSE_BEFORE_STEP": str(pause_before_step),
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(command, env, timeout=300):
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  return result


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _comparable(records):
  """Records without wall-clock quantities (which differ between any two runs)."""
  out = []
  for record in records:
    record = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    if set(record) != {"step"}:
      out.append(record)
  return out


def _last_logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except (FileNotFoundError, ValueError):
    return 0
  return max(steps, default=0)


HANG_GUARD_S = 600  # only for a run that hangs; every wait below ends on an event


def _interrupt(command, env, workdir, *, signum, checkpoint=None, times=1):
  """Starts a run paused (env PAUSE_BEFORE_STEP) before a step; once it says it is paused (and
  has committed the `checkpoint` step: saves are asynchronous) sends `signum` `times` times, each
  once the run has handled the one before, then lets it go on; returns its exit code and
  stderr."""
  stderr_path = os.path.join(workdir, f"stderr_{time.monotonic_ns()}.txt")
  os.makedirs(workdir, exist_ok=True)
  with open(stderr_path, "w") as stderr_file:  # a file: a full stderr pipe cannot block the run
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=stderr_file, text=True)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in process.stdout] + [lines.put(None)],
                   daemon=True).start()
  stderr = lambda: open(stderr_path).read()[-3000:]
  try:
    while True:
      line = lines.get(timeout=HANG_GUARD_S)
      assert line is not None, f"the run ended before pausing: {stderr()}"
      if line.startswith("PAUSED"):
        break
    committed = os.path.join(workdir, "checkpoints", str(checkpoint))
    waited = time.monotonic()
    while checkpoint is not None and not os.path.isdir(committed):  # committed by a rename
      assert process.poll() is None, stderr()
      assert time.monotonic() - waited < HANG_GUARD_S, "checkpoint never committed"
      time.sleep(0.02)
    for i in range(times):
      if i:
        process.stdin.write("ping\n")
        process.stdin.flush()
        while (line := lines.get(timeout=HANG_GUARD_S)) != "PONG\n":
          assert line is not None, f"the run ended after signal {i}: {stderr()}"
      process.send_signal(signum)
    if signum != signal.SIGKILL:
      try:
        process.stdin.write("go\n")
        process.stdin.flush()
      except BrokenPipeError:  # it has stopped at once, as a second Ctrl-C asks
        pass
    process.wait(timeout=HANG_GUARD_S)
  finally:
    if process.poll() is None:
      process.kill()
    process.stdin.close()
  return process.returncode, open(stderr_path).read()


def _final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  return step, manager.restore(step)


@pytest.fixture(scope="module")
def prepared(data_dir, tmp_path_factory):
  pipeline.get_builder(tiny_config(data_dir))  # the dataset once, before any subprocess
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, prepared, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = _run(_command(data_dir, workdir, prepared), _env())
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _assert_stops_after_saving(command, workdir, steps, signum, step):
  """One stop request while step `step`'s batch is read: the step finishes, is saved and
  logged, and the process says so and exits 0."""
  code, stderr = _interrupt(command, _env(pause_before_step=step), workdir, signum=signum)
  assert code == 0, stderr[-3000:]
  name = signal.Signals(signum).name
  assert f"{name} received: stopped after step {step} and saved a checkpoint" in stderr
  assert (f"stopped after step {step} on request; checkpoint saved; run the same command "
          "again to resume") in stderr
  assert max(steps()) == step == _last_logged_step(workdir)


def test_kills_and_stop_requests_then_resume_end_bit_identical(data_dir, prepared, uninterrupted,
                                                               tmp_path):
  workdir = str(tmp_path)
  command = _command(data_dir, workdir, prepared)
  steps = lambda: ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
  # SIGKILL after step 12 (step 10's checkpoint committed): the restart resumes there.
  code, _ = _interrupt(command, _env(pause_before_step=13), workdir, signum=signal.SIGKILL,
                       checkpoint=10)
  assert code == -signal.SIGKILL
  # Ctrl-C while step 16's batch is being read: finish step 16, save it, exit 0.
  _assert_stops_after_saving(command, workdir, steps, signal.SIGINT, 16)
  # Ctrl-C twice while step 23's batch is being read (step 20's checkpoint committed): it stops
  # at once, as Python's KeyboardInterrupt does: no step 23, no save, killed by SIGINT.
  code, stderr = _interrupt(command, _env(pause_before_step=23), workdir, signum=signal.SIGINT,
                            checkpoint=20, times=2)
  assert code == -signal.SIGINT, stderr[-3000:]
  assert "KeyboardInterrupt" in stderr and "stopped after step" not in stderr
  assert max(steps()) == 20 and _last_logged_step(workdir) == 22
  # SIGTERM while step 25's batch is being read: finish step 25, save it, exit 0.
  _assert_stops_after_saving(command, workdir, steps, signal.SIGTERM, 25)
  result = _run(command, _env())
  assert result.returncode == 0, result.stderr[-3000:]

  assert _comparable(_records(workdir)) == _comparable(_records(uninterrupted))
  step, resumed = _final_state(workdir)
  reference_step, reference = _final_state(uninterrupted)
  assert step == reference_step == 30
  leaves, reference_leaves = jax.tree.leaves(resumed), jax.tree.leaves(reference)
  assert len(leaves) == len(reference_leaves) > 10
  for a, b in zip(leaves, reference_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_repeated_runs_are_identical(data_dir, prepared, uninterrupted, tmp_path):
  result = _run(_command(data_dir, str(tmp_path), prepared), _env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert _comparable(_records(tmp_path)) == _comparable(_records(uninterrupted))


def _two_processes(data_dir, workdir, cache_dir, extra, logs, *, signal_process_1_before=0):
  """main.py as processes 0 and 1 of a 2-process job (one CPU device each); with
  `signal_process_1_before=N`, process 1 alone gets SIGTERM while it is paused before step N.
  Returns the exit codes."""
  with reserved_port() as port_socket:
    port = port_socket.getsockname()[1]
    processes = []
    for i, log in enumerate(logs):
      pause = signal_process_1_before if i == 1 else 0
      with open(log, "w") as stderr_file:  # a file: a full pipe of one must not stall both
        processes.append(subprocess.Popen(
            _command(data_dir, workdir, cache_dir, *extra,
                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}"),
            cwd=REPO, env=_env(devices=1, pause_before_step=pause), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if pause else subprocess.DEVNULL, stderr=stderr_file,
            text=True))
    try:
      if signal_process_1_before:
        paused = processes[1]
        for line in paused.stdout:   # process 0 waits meanwhile, in step N's collectives
          if line.startswith("PAUSED"):
            break
        else:
          raise AssertionError(f"process 1 ended before pausing: {logs[1].read_text()[-3000:]}")
        threading.Thread(target=paused.stdout.read, daemon=True).start()  # a full pipe blocks
        paused.send_signal(signal.SIGTERM)
        paused.stdin.write("go\n")
        paused.stdin.close()
      for process in processes:
        process.wait(timeout=HANG_GUARD_S)
    finally:
      for process in processes:
        if process.poll() is None:
          process.kill()
  return [process.returncode for process in processes]


def test_two_processes_stop_together_and_equal_one_process_with_two_devices(data_dir, prepared,
                                                                            tmp_path):
  """SIGTERM to process 1 alone before step 6, log_every_steps=4: both processes stop after
  step 8 (the next step at which they compare their flags), save it and exit 0; resumed, the
  job ends as one process with two devices does."""
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  extra = ("--config.num_train_steps=10", "--config.eval_every_steps=10",
           "--config.checkpoint_every_steps=10", "--config.log_every_steps=4")
  result = _run(_command(data_dir, single, prepared, *extra), _env(devices=2))
  assert result.returncode == 0, result.stderr[-3000:]
  logs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]
  codes = _two_processes(data_dir, multi, prepared, extra, logs, signal_process_1_before=6)
  stderrs = [log.read_text() for log in logs]
  assert codes == [0, 0], [s[-3000:] for s in stderrs]
  assert "JAX devices: 2 (cpu), processes: 2" in stderrs[1]
  assert "SIGTERM received: stopped after step 8" in stderrs[1]
  assert "stop request received: stopped after step 8" in stderrs[0]
  for stderr in stderrs:
    assert "stopped after step 8 on request; checkpoint saved" in stderr
  checkpoints = lambda: ocp.CheckpointManager(os.path.join(multi, "checkpoints")).all_steps()
  assert checkpoints() == [8] and _last_logged_step(multi) == 8
  codes = _two_processes(data_dir, multi, prepared, extra, logs)
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  assert checkpoints() == [8, 10]

  single_records, multi_records = _comparable(_records(single)), _comparable(_records(multi))
  # Process 0 alone wrote metrics: one record per step, not two.
  assert [r["step"] for r in multi_records] == [r["step"] for r in single_records] == [4, 8, 10, 10]
  single_eval, multi_eval = single_records[-1], multi_records[-1]
  assert "eval/dice" in multi_eval
  assert multi_eval == pytest.approx(single_eval, rel=1e-6, abs=1e-7)
  assert [r["train/loss"] for r in multi_records if "train/loss" in r] == pytest.approx(
      [r["train/loss"] for r in single_records if "train/loss" in r], rel=1e-6)


# ---------------------------------------------------------------------------- in-process faults

@pytest.fixture
def short_config(data_dir):
  config = tiny_config(data_dir)
  config.num_train_steps = 20
  config.eval_every_steps = 20
  return config


def test_damaged_checkpoints_are_skipped_and_interrupted_saves_ignored(short_config, tmp_path,
                                                                        caplog):
  train.train_and_evaluate(short_config, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [10, 20]
  # A save killed midway leaves only a temporary directory: it is not a checkpoint.
  (ckpt_dir / "30.orbax-checkpoint-tmp-1234567").mkdir()
  (ckpt_dir / "30.orbax-checkpoint-tmp-1234567" / "half_written").write_bytes(b"\x00" * 10)
  # Step 20's array data is destroyed: resuming must fall back to step 10, not crash or restart.
  for root, _, files in os.walk(ckpt_dir / "20"):
    for name in files:
      if name not in ("_CHECKPOINT_METADATA",):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  trainer = train.Trainer(short_config, str(tmp_path))
  with caplog.at_level("WARNING"):
    state = trainer.initial_state()
  trainer.checkpoints.close()
  assert int(state.step) == 10
  assert "Checkpoint at step 20" in caplog.text and "cannot be restored" in caplog.text


def test_checkpoint_of_another_model_is_a_clear_error(short_config, tmp_path):
  short_config.num_train_steps = 10
  train.train_and_evaluate(short_config, str(tmp_path))
  other = short_config.copy_and_resolve_references()
  other.model.width = 16
  with pytest.raises(train.WorkdirError, match=r"no checkpoint in .* can be restored for this config"):
    train.Trainer(other, str(tmp_path)).initial_state()


def test_restore_never_unpickles(short_config, tmp_path, monkeypatch):
  short_config.num_train_steps = 10
  train.train_and_evaluate(short_config, str(tmp_path))

  def refuse(*args, **kwargs):
    raise AssertionError("pickle used while restoring a checkpoint")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  trainer = train.Trainer(short_config, str(tmp_path))
  assert int(trainer.initial_state().step) == 10
  trainer.checkpoints.close()
  for root, _, files in os.walk(tmp_path / "checkpoints"):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        head = f.read(2)
      assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), name  # pickle magic


def test_unwritable_workdir_fails_before_training(short_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(train.WorkdirError, match=r"workdir .*a_file/run is not writable"):
    train.train_and_evaluate(short_config, str(blocker / "run"))


def _nan_at(monkeypatch, steps, *, drop=False):
  """Training batches at `steps` (1-based) get NaN images; with `drop`, they are left out of
  the stream instead (the steps that follow get the batches that came after them)."""
  real = pipeline.train_batches

  def corrupted(*args, **kwargs):
    for step, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
      if step in steps:
        if drop:
          continue
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch

  monkeypatch.setattr(pipeline, "train_batches", corrupted)


def _flat_state(state) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


SKIP_COUNTERS = ("notfinite_count", "last_finite", "total_notfinite")


def test_skip_mode_drops_nonfinite_updates_and_counts_them(short_config, tmp_path, monkeypatch):
  """Two skipped steps (6 and 7, NaN images) leave the state exactly as if they never happened:
  the run ends bit for bit where a run without those two batches is two steps earlier. With a
  warm-up + cosine schedule, a skipped step that advanced the schedule, moved Adam's moments or
  kept the NaN forward pass's batch statistics would show."""
  short_config.on_nonfinite = "skip"
  short_config.log_every_steps = 1
  short_config.checkpoint_every_steps = 9  # saves 9, 18 and the last step, 20
  short_config.optimizer.schedule = "warmup_cosine"
  short_config.optimizer.warmup_steps = 8  # steps 6, 7 mid-warm-up: the lr changes every step
  short_config.optimizer.end_learning_rate_factor = 0.1
  real_batches = pipeline.train_batches
  _nan_at(monkeypatch, {6, 7})
  skipped_dir, clean_dir = tmp_path / "skipped", tmp_path / "clean"
  final = train.train_and_evaluate(short_config, str(skipped_dir))
  assert 0.0 <= final["eval/dice"] <= 1.0
  records = {r["step"]: r for r in _records(skipped_dir) if "train/loss" in r}
  assert records[5]["train/skipped_steps"] == 0
  assert records[6]["train/loss"] is None and records[6]["train/skipped_steps"] == 1
  assert records[7]["train/skipped_steps"] == 2 and records[20]["train/skipped_steps"] == 2
  assert records[6]["train/param_norm"] == records[5]["train/param_norm"]
  assert records[7]["train/param_norm"] == records[5]["train/param_norm"]
  # train/learning_rate is the rate the optimiser used: its schedule count is the number of
  # applied updates, which the skipped steps 6 and 7 did not advance (count k - 1 up to step 6,
  # 5 at steps 6 to 8, k - 3 after). warmup_cosine by its formula, 20 steps, warm-up 8.
  o = short_config.optimizer
  peak, end = o.learning_rate, o.learning_rate * o.end_learning_rate_factor

  def lr_at(count):
    if count < 8:
      return peak * count / 8
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (count - 8) / 12))

  counts = {k: k - 1 if k <= 6 else max(5, k - 3) for k in range(1, 21)}
  assert [records[k]["train/learning_rate"] for k in range(1, 21)] == pytest.approx(
      [lr_at(counts[k]) for k in range(1, 21)], rel=1e-6, abs=1e-9)

  # The same run without batches 6 and 7 at all, same schedule (num_train_steps=20).
  monkeypatch.setattr(pipeline, "train_batches", real_batches)
  _nan_at(monkeypatch, {6, 7}, drop=True)
  train.train_and_evaluate(short_config, str(clean_dir))
  # ... whose learning rate at step k - 2 is the skipping run's at step k, from step 8 on.
  clean_records = {r["step"]: r for r in _records(clean_dir) if "train/loss" in r}
  assert [records[k]["train/learning_rate"] for k in range(8, 21)] == \
      [clean_records[k - 2]["train/learning_rate"] for k in range(8, 21)]
  skipped_step, skipped = _final_state(str(skipped_dir))
  clean = ocp.CheckpointManager(os.path.join(clean_dir, "checkpoints")).restore(18)
  assert skipped_step == 20 and int(skipped["step"]) == 20 and int(clean["step"]) == 18
  skipped, clean = _flat_state(skipped), _flat_state(clean)
  assert skipped.keys() == clean.keys()
  compared = {"params": 0, "batch_stats": 0, "opt_state": 0}
  for key in sorted(skipped):
    counter = next((c for c in SKIP_COUNTERS if c in key), None)
    if counter == "total_notfinite":
      assert int(skipped[key]) == 2 and int(clean[key]) == 0, key
    elif counter == "notfinite_count":
      assert int(skipped[key]) == int(clean[key]) == 0, key
    elif counter == "last_finite":
      assert bool(skipped[key]) and bool(clean[key]), key
    elif key != "['step']":
      assert np.isfinite(skipped[key]).all(), key
      np.testing.assert_array_equal(skipped[key], clean[key], err_msg=key)
      compared[key.split("'")[1]] += 1
  # Every part of the state was compared: weights, batch statistics, Adam's moments and count.
  assert compared["params"] > 10 and compared["batch_stats"] > 4 and compared["opt_state"] > 20, \
      compared
  assert any("count" in k and int(v) == 18 for k, v in skipped.items()), \
      {k: v for k, v in skipped.items() if "count" in k}


def test_skip_mode_stops_after_too_many_consecutive_skips(short_config, tmp_path, monkeypatch):
  short_config.on_nonfinite = "skip"
  short_config.max_consecutive_skips = 2
  short_config.check_finite_every_steps = 1
  _nan_at(monkeypatch, {3, 4, 5, 6})
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps .* up to step 5"):
    train.train_and_evaluate(short_config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_nonfinite_parameters_are_named(short_config, tmp_path):
  # A finite loss and gradient, but a step so large the parameters overflow.
  short_config.optimizer.learning_rate = 1e38
  short_config.check_finite_every_steps = 1
  with pytest.raises(train.NonFiniteError, match=r"non-finite param_norm \(inf\) at step 1;"):
    train.train_and_evaluate(short_config, str(tmp_path))


def test_finite_check_before_a_checkpoint_between_log_steps(short_config, tmp_path, monkeypatch):
  """log_every_steps=10 and a checkpoint every 4 steps: a NaN at step 6, between log steps, stops
  the run at step 8 before step 8's checkpoint is written, naming step 6; step 4's checkpoint
  is kept and holds exactly what a clean run stopped at step 4 holds."""
  short_config.log_every_steps = 10
  short_config.checkpoint_every_steps = 4
  assert short_config.check_finite_every_steps == 0   # so: every log step and every checkpoint
  _nan_at(monkeypatch, {6})
  nan_dir = tmp_path / "nan"
  with pytest.raises(train.NonFiniteError) as error:
    train.train_and_evaluate(short_config, str(nan_dir))
  assert str(error.value) == ("non-finite loss (nan) at step 6; training stopped without saving; "
                              f"last good checkpoint: step 4 in {nan_dir / 'checkpoints'}")
  manager = ocp.CheckpointManager(str(nan_dir / "checkpoints"))
  assert manager.all_steps() == [4]
  saved = _flat_state(manager.restore(4))
  manager.close()

  clean = short_config.copy_and_resolve_references()
  clean.num_train_steps = 4
  clean_dir = tmp_path / "clean"
  train.train_and_evaluate(clean, str(clean_dir))   # steps 1-4 see the same batches
  manager = ocp.CheckpointManager(str(clean_dir / "checkpoints"))
  want = _flat_state(manager.restore(4))
  manager.close()
  assert saved.keys() == want.keys() and len(want) > 10
  for name in want:
    np.testing.assert_array_equal(saved[name], want[name], err_msg=name)
