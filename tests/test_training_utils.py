import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from cm_diffusers.training.checkpoints import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    raise_if_not_finite,
    save_checkpoint,
)
from cm_diffusers.training.runtime import make_accelerator


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class Counter:
    """A stateful extra object (like an EMA) checkpointed through register_for_checkpointing."""

    def __init__(self):
        self.value, self.fail = 0, False

    def state_dict(self):
        if self.fail:
            raise OSError("disk full (simulated)")
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def setup_run(tmp_path):
    accelerator = make_accelerator()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, counter


def train_step(model, optimizer):
    loss = model(torch.ones(4, 3)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_single_process_accelerator():
    accelerator = make_accelerator()
    assert accelerator.distributed_type == DistributedType.NO
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
            make_accelerator(mixed_precision="fp16")


def test_save_load_roundtrip_restores_weights_step_and_extra_objects(tmp_path):
    accelerator, model, optimizer, counter = setup_run(tmp_path)
    train_step(model, optimizer)
    counter.value = 7
    path = save_checkpoint(accelerator, str(tmp_path), global_step=5)
    assert path == str(tmp_path / "checkpoint-5")
    state = json.loads((tmp_path / "checkpoint-5" / "training_state.json").read_text())
    assert state == {"global_step": 5, "settings": {}}
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    train_step(model, optimizer)
    counter.value = 99
    assert load_checkpoint(accelerator, find_checkpoint(str(tmp_path), "latest")) == 5
    assert counter.value == 7
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_failure_mid_save_keeps_the_previous_checkpoint(tmp_path):
    accelerator, model, optimizer, counter = setup_run(tmp_path)
    save_checkpoint(accelerator, str(tmp_path), global_step=10)
    train_step(model, optimizer)
    counter.fail = True
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, str(tmp_path), global_step=20)
    assert not (tmp_path / "checkpoint-20").exists()
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    assert sorted(os.listdir(tmp_path / "checkpoint-10")) == sorted(
        ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "training_state.json"]
    )
    # the next good save replaces the partial folder and cleans it up
    counter.fail = False
    save_checkpoint(accelerator, str(tmp_path), global_step=30)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-30"]


def test_pruning_keeps_the_newest(tmp_path):
    accelerator, *_ = setup_run(tmp_path)
    for step in (100, 200, 300, 400):
        save_checkpoint(accelerator, str(tmp_path), global_step=step, checkpoints_total_limit=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [300, 400]
    save_checkpoint(accelerator, str(tmp_path), global_step=400, checkpoints_total_limit=2)  # same step again
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [300, 400]


def test_find_checkpoint_lookup_and_errors(tmp_path):
    assert find_checkpoint(str(tmp_path), None) is None
    assert find_checkpoint(str(tmp_path), "latest") is None  # nothing yet: a fresh run
    for step in (9, 10, 2):  # numeric order, not lexicographic
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "training_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-11").mkdir()  # no training_state.json: not a complete checkpoint
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-10")
    assert find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-77"))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-11"))


def test_nan_loss_names_step_and_last_checkpoint(tmp_path):
    raise_if_not_finite(torch.tensor(0.5), 3, str(tmp_path))
    with pytest.raises(FloatingPointError, match="at step 3. No checkpoint was saved yet"):
        raise_if_not_finite(torch.tensor(float("nan")), 3, str(tmp_path))
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "training_state.json").write_text('{"global_step": 40}')
    with pytest.raises(FloatingPointError, match=r"inf at step 41\. The last good checkpoint is .*checkpoint-40"):
        raise_if_not_finite(torch.tensor(float("inf")), 41, str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a multi-process launch")
def test_two_process_cpu_launch_forms_a_gloo_group(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from cm_diffusers.training.checkpoints import save_checkpoint
            from cm_diffusers.training.runtime import make_accelerator
            accelerator = make_accelerator()
            rank = torch.tensor([float(accelerator.process_index + 1)])
            total = accelerator.reduce(rank, "sum").item()
            save_checkpoint(accelerator, "{out}", global_step=1)
            with open(f"{out}/rank{{accelerator.process_index}}.txt", "w") as f:
                f.write(f"{{accelerator.distributed_type}} {{accelerator.num_processes}} {{total}}")
            """.format(out=tmp_path / "run")
        )
    )
    with socket.socket() as sock:  # a free port: other test runs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # both ranks joined one group: the reduce saw both contributions
        assert (tmp_path / "run" / f"rank{rank}.txt").read_text() == "DistributedType.MULTI_CPU 2 3.0"
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint-1")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
        "training_state.json",
    ]


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint could carry."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/cm_diffusers_pwned",))


def test_tampered_checkpoint_is_refused_without_running_its_payload(tmp_path):
    import pickle

    accelerator, model, optimizer, counter = setup_run(tmp_path)
    path = save_checkpoint(accelerator, str(tmp_path), global_step=1)
    marker = "/tmp/cm_diffusers_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with open(os.path.join(path, "custom_checkpoint_0.pkl"), "wb") as f:
        pickle.dump({"value": _Payload()}, f)
    with pytest.raises(ValueError, match="holds more than tensors"):
        load_checkpoint(accelerator, path)
    assert not os.path.exists(marker)
