"""A study's identity: a rerun on the same inputs resumes, a changed input is refused with what changed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from harness.errors import UserError
from harness.plan.hardware import detect_hardware
from harness.space import load_space
from harness.study.objectives import CapacityObjective
from harness.study.runner import make_sampler, open_study
from harness.study.tune import _hw_identity


def _identity(space_file: Path, hardware: dict) -> dict:
    space = load_space(space_file)
    return {"model": "m", "space": space.to_dict(), "hardware": hardware}


def _open(storage: str, identity: dict) -> optuna.Study:
    return open_study("s", optuna.storages.RDBStorage(storage), ["maximize"], make_sampler("random", CapacityObjective(), None, 0, 2),
                      identity)


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("name: t\nfixed: {max_model_len: 512}\nknobs:\n  max_num_seqs: {type: categorical, choices: [4, 8]}\n")
    return path


def test_same_inputs_resume_although_storage_turns_tuples_into_lists(tmp_path: Path, space_file: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    hw = {"name": "CPU", "count": 1, "memory_gib": None, "arch": "cpu"}
    first = _open(storage, _identity(space_file, hw))
    again = _open(storage, _identity(space_file, hw))  # knob choices are a tuple here, a list once stored
    assert again._study_id == first._study_id


def test_the_space_files_path_is_not_identity(tmp_path: Path, space_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same space read by an absolute and a relative path resumes; so does a study stored with the path."""
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    hw = {"name": "CPU", "count": 1, "memory_gib": None, "arch": "cpu"}
    first = _open(storage, _identity(space_file, hw))
    monkeypatch.chdir(space_file.parent)
    assert _open(storage, _identity(Path(space_file.name), hw))._study_id == first._study_id
    stored = first.user_attrs["identity"]
    first.set_user_attr("identity", {**stored, "space": {**stored["space"], "source": str(space_file)}})  # older
    assert _open(storage, _identity(Path(space_file.name), hw))._study_id == first._study_id


def test_changed_input_is_refused_naming_only_what_changed(tmp_path: Path, space_file: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    gpu = {"name": "H100", "count": 4, "memory_gib": 79.18, "arch": "hopper"}
    _open(storage, _identity(space_file, gpu))
    with pytest.raises(UserError) as exc:
        _open(storage, _identity(space_file, {**gpu, "count": 2}))
    msg = str(exc.value)
    assert "different hardware (" in msg and "space" not in msg.split("(")[0]
    assert '"count": 4' in msg and '"count": 2' in msg
    assert exc.value.key == "hardware"


def test_cpu_host_identity_ignores_memory_that_grows_while_the_host_runs() -> None:
    host = detect_hardware("CPU")
    grown = replace(host, memory_gib=host.memory_gib + 3.5)
    assert _hw_identity(host) == _hw_identity(grown)
    gpu = detect_hardware("H100", 4)
    assert _hw_identity(gpu)["memory_gib"] == gpu.memory_gib  # a GPU's CUDA total is fixed: it stays in the identity


def test_baselines_are_queued_once_across_reruns(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from harness.study.runner import enqueue_baselines

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    defaults = {"max_model_len": 512}

    def queued() -> list[tuple[str, dict, str]]:
        return [(t.user_attrs["baseline"], t.user_attrs["settings"], t.state.name) for t in study.get_trials()]

    enqueue_baselines(study, {"vllm-defaults": defaults, "committed-config": dict(defaults)})
    assert queued() == [("vllm-defaults", defaults, "WAITING")]  # the committed config is the defaults: once
    trial = study.ask()
    study.tell(trial, 1.0)
    enqueue_baselines(study, {"vllm-defaults": defaults, "committed-config": dict(defaults)})  # a rerun
    assert queued() == [("vllm-defaults", defaults, "COMPLETE")]
    tuned = {**defaults, "max_num_seqs": 8}
    enqueue_baselines(study, {"vllm-defaults": defaults, "committed-config": tuned})  # a new config was committed
    assert queued()[1:] == [("committed-config", tuned, "WAITING")]
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # interrupted: measured again on the next run
    enqueue_baselines(study, {"vllm-defaults": defaults, "committed-config": tuned})
    assert queued()[1:] == [("committed-config", tuned, "FAIL"), ("committed-config", tuned, "WAITING")]
