"""Fixtures more than one test module uses."""
import pytest
import torch

import train_tiny


@pytest.fixture(scope="session")
def quick_scenes_run(tmp_path_factory):
    """A --world scenes --quick run, trained once (test_train_tiny's end to end, notebook 06)."""
    out = tmp_path_factory.mktemp("quick_scenes")
    torch.set_num_threads(2)
    metrics = train_tiny.main(train_tiny.parse_args(["--world", "scenes", "--quick", "--eval-images", "8",
                                                     "--out", str(out), "--device", "cpu"]))
    return out, metrics
