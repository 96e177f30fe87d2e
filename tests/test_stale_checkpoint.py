"""--resume after a killed driver whose saved state names a checkpoint Tune deleted since (a newer
one arrived while the loss went up): the trial resumes from the newest checkpoint that exists."""

import json

import pyarrow.fs
from ray import cloudpickle
from ray.train import Checkpoint, CheckpointConfig
from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

from lora_rank_search.search.storage import repair_stale_checkpoints


def _state(experiment, manager) -> None:
    runtime = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": cloudpickle.dumps(manager).hex()}}
    data = {"trial_data": [[json.dumps({"relative_logdir": "r8"}), json.dumps(runtime)]], "runner_data": {}}
    (experiment / "experiment_state-2026-12-06_03-58-00.json").write_text(json.dumps(data))


def _latest(experiment) -> str:
    data = json.loads((experiment / "experiment_state-2026-12-06_03-58-00.json").read_text())
    runtime = json.loads(data["trial_data"][0][1])
    manager = cloudpickle.loads(bytes.fromhex(runtime["checkpoint_manager"]["value"]))
    return manager.latest_checkpoint_result.checkpoint.path


def test_a_saved_latest_checkpoint_deleted_since_falls_back_to_the_newest_that_exists(tmp_path):
    experiment = tmp_path / "interrupted"
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"))
    fs = pyarrow.fs.LocalFileSystem()
    for index, (step, loss) in enumerate([(30, 3.0), (60, 2.0), (90, 2.5)]):
        folder = experiment / "r8" / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder), filesystem=fs), {"step": step, "eval_loss": loss}))
    _state(experiment, manager)  # saved: latest = step 90 (checkpoint_000002)
    # then a step-120 checkpoint arrived, step 90's (not among the best two) was deleted, the driver was killed
    (experiment / "r8" / "checkpoint_000002").rmdir()

    said = repair_stale_checkpoints(str(experiment))
    assert said == ["resume: r8: its saved latest checkpoint (checkpoint_000002) was deleted after the state was saved;"
                    " it resumes from its step-60 checkpoint"]
    assert _latest(experiment).endswith("checkpoint_000001")
    assert repair_stale_checkpoints(str(experiment)) == [], "nothing left to repair"


def test_a_state_whose_checkpoints_exist_is_left_as_it_is(tmp_path):
    experiment = tmp_path / "interrupted"
    folder = experiment / "r8" / "checkpoint_000000"
    folder.mkdir(parents=True)
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder)), {"step": 30}))
    _state(experiment, manager)
    before = (experiment / "experiment_state-2026-12-06_03-58-00.json").read_text()
    assert repair_stale_checkpoints(str(experiment)) == []
    assert (experiment / "experiment_state-2026-12-06_03-58-00.json").read_text() == before
    assert repair_stale_checkpoints(str(tmp_path / "nothing-here")) == []
