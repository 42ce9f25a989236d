"""The QAT and QLoRA training loop: two processes under torchrun (DDP, Gloo) give the single-process result for
the same global batch; a killed run resumes from its checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
import _qat_train_job as job  # noqa: E402

from qcompiler.errors import ConfigError  # noqa: E402
from qcompiler.torch.train import TrainConfig, train  # noqa: E402


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("mode, trained", [("qat", "0.weight"), ("qlora", "0.lora_A")])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, mode, trained):
    initial = {k: v.clone() for k, v in job.build(mode)[0].state_dict().items()}
    single, result = job.run(mode=mode)
    assert not torch.equal(single.state_dict()[trained], initial[trained])  # it trained
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "QCOMPILER_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(job.__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           job.__file__, str(out), mode], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["world"] == 2
    _close(saved["state"], single.state_dict())
    assert saved["losses"] == pytest.approx(result.losses, rel=1e-5)


@pytest.mark.parametrize("mode", ["qat", "qlora"])
def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, mode):
    uninterrupted, _ = job.run(mode=mode)
    checkpoint = tmp_path / "run.pt"
    calls = 0

    def dies_at_step_five(model, batch):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return job.loss_fn(model, batch)

    with pytest.raises(KeyboardInterrupt):
        job.run(checkpoint=str(checkpoint), loss=dies_at_step_five, mode=mode)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    resumed, result = job.run(checkpoint=str(checkpoint), mode=mode)
    assert result.start_step == 3 and len(result.losses) == 6
    _close(resumed.state_dict(), uninterrupted.state_dict())
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_training_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=float("nan"))
    model, data = job.build()
    checkpoint = tmp_path / "c.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        train(model, data, job.loss_fn, TrainConfig(steps=2, progress=False, checkpoint=str(checkpoint)))
    job.run(steps=3, checkpoint=str(tmp_path / "d.pt"))
    with pytest.raises(ConfigError, match="other settings"):
        job.run(steps=4, checkpoint=str(tmp_path / "d.pt"))
