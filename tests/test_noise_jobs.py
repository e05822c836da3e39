"""The resumable assignment-job runner (diffalign.noise.jobs): a folder of other settings."""

from __future__ import annotations

import pytest

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import write_json
from diffalign.noise.jobs import AssignmentJob, run_assignment_job


def test_other_settings_name_the_keys_and_both_ways_out(tmp_path):
    """A folder holding a finished item refuses other settings with both ways out (every
    assignment verb, `noise em` included, spells its folder --output-dir and has --overwrite)."""
    write_json(tmp_path / "dataset_config.json", {"steps": 3, "lr": 0.1})
    (tmp_path / "manifest.jsonl").write_text('{"id": 0}\n')  # one item finished
    with pytest.raises(DiffalignError) as e:
        run_assignment_job(AssignmentJob(), tmp_path, {"steps": 4, "lr": 0.1}, batch_size=1)
    msg = str(e.value)
    assert "other settings (steps)" in msg
    assert "settings it was made with" in msg and "--output-dir" in msg and "--overwrite" in msg
