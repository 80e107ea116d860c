import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny pipelines are dominated by per-op overhead; one thread avoids contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=__import__("devices").DEVICES)
def device(request):
    """Each device present: "cpu", plus "cuda" when a GPU is visible. Tests that also
    need a backend take (device, backend) params from devices.device_backends()."""
    return request.param
