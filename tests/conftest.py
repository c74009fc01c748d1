"""Shared fixtures: real data paths, a real MQTT broker, small exported models."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
GAS_DIR = os.path.join(SHARED_DATA, "gas-sensor-drift")
OCCUPANCY_DIR = os.path.join(SHARED_DATA, "occupancy")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


@pytest.fixture(scope="session")
def gas_dir():
    if not os.path.isfile(os.path.join(GAS_DIR, "batch1.dat")):
        pytest.fail(f"gas drift data not found at {GAS_DIR} (expected ../shared/data beside the repo)")
    return GAS_DIR


@pytest.fixture(scope="session")
def occupancy_dir():
    if not os.path.isfile(os.path.join(OCCUPANCY_DIR, "datatraining.txt")):
        pytest.fail(f"occupancy data not found at {OCCUPANCY_DIR}")
    return OCCUPANCY_DIR


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """(host, port) of a real mosquitto: the one on 127.0.0.1:1883 if it listens, else one we start."""
    if port_open("127.0.0.1", 1883):
        yield ("127.0.0.1", 1883)
        return
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("no MQTT broker on 127.0.0.1:1883 and no mosquitto binary: apt-get install mosquitto")
    port = free_port()
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("could not start mosquitto for the tests")
        time.sleep(0.05)
    yield ("127.0.0.1", port)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def fleet():
    """A fleet name no other test uses, so retained messages never leak between tests."""
    return "t" + uuid.uuid4().hex[:12]


def make_model(sizes=(8, 16, 16, 3), seed=0):
    from edge_spl.model import init_model

    rng = np.random.default_rng(seed)
    d = sizes[0]
    state = init_model(list(sizes), rng.standard_normal(d), rng.uniform(0.5, 2.0, d),
                       [f"c{i}" for i in range(sizes[-1])], [f"f{i}" for i in range(d)], seed=seed,
                       model_id="tiny")
    for L in state.layers:
        L["g"][:] = rng.standard_normal(L["g"].shape).astype(np.float32) * 0.3
    return state


@pytest.fixture
def tiny_model_dir(tmp_path):
    """An exported random model (8-16-16-3) in a temp folder."""
    from edge_spl.export.onnx_export import export_model

    state = make_model()
    d = tmp_path / "model"
    state.save(d)
    export_model(state).save(str(d))
    return str(d)


@pytest.fixture
def own_mosquitto(tmp_path):
    """A factory: start a mosquitto of the test's own on a free port with extra config lines
    (`max_packet_size 4096`, ...); returns (host, port). Stopped at the end of the test."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("no mosquitto binary: apt-get install mosquitto")
    procs = []

    def start(extra: str = "", port: int | None = None) -> tuple[str, int]:
        port = port or free_port()
        folder = tmp_path / f"mosquitto-{port}"
        folder.mkdir()
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n")
        log = open(folder / "log.txt", "wb")
        proc = subprocess.Popen([binary, "-c", str(conf), "-v"], stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"could not start mosquitto: {(folder / 'log.txt').read_text()}")
            time.sleep(0.05)
        return ("127.0.0.1", port)

    yield start
    for proc, log in procs:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
