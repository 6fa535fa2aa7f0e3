"""Shared pytest fixtures."""
import os

import pytest


# --- the device of device-aware tests (make gpu-check sets DEVICE=cuda) ----------------------
@pytest.fixture(scope="session")
def device():
    """torch.device from the DEVICE environment variable (default cpu). A device that is not there fails
    the test rather than skipping it. On CUDA, float32 convolutions and matmuls run in full float32
    (no TF32), as the references these tests compare against were computed."""
    import torch

    dev = torch.device(os.environ.get("DEVICE", "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"DEVICE={dev} but torch.cuda.is_available() is False")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


# --- local Hugging Face Hub (tests/hub_server.py), for tests/test_hub.py ---------------------
@pytest.fixture
def hub(tmp_path):
    """A Hub-protocol server on 127.0.0.1 (random ports) storing files under tmp_path/hub.

    It accepts one dummy token, `hub.token`, belonging to user `hub.user`.
    """
    from hub_server import HubServer

    server = HubServer(tmp_path / "hub", user="alice", token="hf_DummyNfnetZooToken0123456789abcd").start()
    yield server
    server.stop()


# --- the image check cache (nfnet_zoo.data.image_check) --------------------------------------------
@pytest.fixture(autouse=True, scope="session")
def _image_check_cache(tmp_path_factory):
    """Check results go to a folder of this test session, never to the user's cache."""
    import os
    old = os.environ.get("NFNET_ZOO_CACHE")
    os.environ["NFNET_ZOO_CACHE"] = str(tmp_path_factory.mktemp("image-checks"))
    yield
    if old is None:
        os.environ.pop("NFNET_ZOO_CACHE", None)
    else:
        os.environ["NFNET_ZOO_CACHE"] = old


# --- torch.compile state ------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: shapes an earlier test compiled make dynamo retrace the same code
    with dynamic shapes, whose symbolic reasoning took over ten minutes for a training graph here."""
    import sys
    yield
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
