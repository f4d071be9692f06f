"""DeepSpeed ZeRO checkpoints on CPU: directory detection, the errors, and a real 2-rank ZeRO-2 checkpoint (raw
``deepspeed.initialize`` under gloo, ``DS_ACCELERATOR=cpu``) consolidated and exported. The same under ZeRO-3
did not finish on DeepSpeed's CPU backend here (2 ranks, deepspeed 0.19.8), so stage 3 is covered on the GPU
by tests/tasks/test_deepspeed.py. Needs deepspeed (not installed in CI): about 2 minutes on 2 cores.

The sharded checkpoints are written the way Lightning's DeepSpeed strategy writes them (the LightningModule's
parameters, ``client_state`` holding the checkpoint's other entries, tag ``checkpoint``), by this file run
under torchrun (see :func:`_write_zero_checkpoints`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpretrain.checkpoints import (
    CheckpointError,
    find_last_checkpoint,
    is_zero_checkpoint,
    read_checkpoint,
)

SEQ = 16
VOCAB = 1405  # the demo tokenizer's (bos 1, eos 0, pad 2), which the export writes beside the model


def _task():
    from mmpretrain.tasks.semicausal_lm import SemiCausalLM

    return SemiCausalLM(preset="metalm_demo", vocab_size=VOCAB, bos_id=1, eos_id=0, pad_id=2)


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))}


def _fake_zero_dir(path: Path, with_latest: bool = True) -> Path:
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if with_latest:
        (path / "latest").write_text("checkpoint")
    return path


def test_zero_directories_are_recognised_and_found_as_last(tmp_path: Path) -> None:
    run = tmp_path / "run" / "checkpoints"
    old = run / "last.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"a file")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    zero = _fake_zero_dir(tmp_path / "run" / "v1" / "last.ckpt")
    assert is_zero_checkpoint(zero) and is_zero_checkpoint(_fake_zero_dir(tmp_path / "z", with_latest=False))
    assert not is_zero_checkpoint(old) and not is_zero_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "empty" / "last.ckpt").mkdir(parents=True)  # a directory that is no checkpoint
    assert find_last_checkpoint(tmp_path / "run") == zero
    # a rewrite of the file makes it the newest again; a directory's age is that of its newest file
    os.utime(old, None)
    os.utime(zero / "checkpoint" / "mp_rank_00_model_states.pt", ns=(2_000_000_000, 2_000_000_000))
    os.utime(zero / "latest", ns=(2_000_000_000, 2_000_000_000))
    assert find_last_checkpoint(tmp_path / "run") == old
    # Lightning's save_last="link": last.ckpt is a symbolic link to a step directory
    link_run = tmp_path / "linked"
    step = _fake_zero_dir(link_run / "step00000010.ckpt")
    (link_run / "last.ckpt").symlink_to(step.name)
    assert find_last_checkpoint(link_run) == link_run / "last.ckpt"


def test_errors_name_the_directory_and_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        read_checkpoint(plain)
    zero = _fake_zero_dir(tmp_path / "last.ckpt")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install 'mmpretrain\[deepspeed\]'") as err:
        read_checkpoint(zero)
    assert str(zero) in str(err.value)
    from mmpretrain.export import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(zero), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2


def test_a_broken_zero_directory_is_named(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    zero = _fake_zero_dir(tmp_path / "last.ckpt")  # shards that are no pickles
    with pytest.raises(Exception, match=str(zero)):
        read_checkpoint(zero)


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    with socket.socket() as sock:  # a free port (DeepSpeed reads MASTER_PORT itself: port 0 would hang it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           __file__, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"the 2-rank DeepSpeed run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return out


@pytest.mark.parametrize("stage", [2])
def test_a_real_zero_checkpoint_consolidates_and_exports(zero_checkpoints: Path, stage: int, tmp_path: Path) -> None:
    import transformers

    directory = zero_checkpoints / f"stage{stage}" / "last.ckpt"
    assert is_zero_checkpoint(directory)
    shards = sorted(p.name for p in (directory / "checkpoint").iterdir())
    assert sum("optim_states" in name for name in shards) == 2, shards  # one optimizer shard per rank
    expected = torch.load(zero_checkpoints / f"stage{stage}" / "full.pt", weights_only=True)
    checkpoint = read_checkpoint(directory)
    assert checkpoint["mmpretrain"]["task"].endswith("SemiCausalLM")
    state = checkpoint["state_dict"]
    assert set(state) >= set(expected) and len(expected) > 10
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # the export of the directory computes what the trained model computes
    from mmpretrain.export import main

    out = tmp_path / "hf"
    assert main(["--checkpoint", str(directory), "--output", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    task = _task()
    task.configure_model()
    task.load_state_dict(expected, strict=False)
    task.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, task.model(ids), rtol=1e-5, atol=1e-5)


def _write_zero_checkpoints(out: Path) -> None:
    """Run under torchrun with 2 ranks: one training step under ZeRO-2, saved as Lightning's
    DeepSpeed strategy saves (``<out>/stage<N>/last.ckpt/``), and the full weights after the step (gathered)
    in ``full.pt`` for the test to compare with."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (2,):
        torch.manual_seed(0)
        task = _task()
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
        with deepspeed.zero.Init(enabled=stage == 3, config_dict_or_path=config):
            task.configure_model()
        for module, parameter in task.external_parameters():  # what the task does under Lightning's strategy
            if stage == 3:
                deepspeed.zero.register_external_parameter(module, parameter)
        optimizer = torch.optim.AdamW(task.parameter_groups(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
        batch = _batch()
        batch["input_ids"] = batch["input_ids"].roll(dist.get_rank())  # ranks see different data
        loss = task.compute_loss(task.model, batch)["loss"]
        engine.backward(loss)
        engine.step()
        client = {"hyper_parameters": dict(task.hparams), "global_step": 1, "epoch": 0,
                  "datamodule_hyper_parameters": {"tokenizer": "demo", "seq_len": SEQ},
                  "mmpretrain": {"task": f"{type(task).__module__}.{type(task).__qualname__}"}}
        target = out / f"stage{stage}"
        engine.save_checkpoint(str(target / "last.ckpt"), client_state=client, tag="checkpoint")
        with deepspeed.zero.GatheredParameters(list(task.parameters()), enabled=stage == 3):
            full = {k: v.detach().clone().float() for k, v in task.state_dict().items()}
        if dist.get_rank() == 0:
            torch.save(full, target / "full.pt")
        dist.barrier()
        engine.destroy() if hasattr(engine, "destroy") else None


if __name__ == "__main__":
    _write_zero_checkpoints(Path(sys.argv[1]))
