"""Shared pytest fixtures."""
import pytest


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
