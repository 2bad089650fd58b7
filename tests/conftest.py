import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_sessionstart(session):
    """Whatever the code under test puts in the temp folder (each app session's folder, Gradio's cache, exports, the
    servers and browsers the tests start) goes under pytest's own base folder, which a passing run removes
    (pytest.ini: ``tmp_path_retention_policy = failed``) and a failing one keeps for a look, the last one only."""
    import tempfile

    temp = session.config._tmp_path_factory.getbasetemp() / "tmp"
    temp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(temp)


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level tokenizer whose ids can be written by hand: [ INST ] a cat the dog sun ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "[", "INST", "]", "a", "cat", "the", "dog", "sun", "‹", "›",
             "img_00001", "/", "img", "ran", ".", "x"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_tokens(["<img>", "</img>"] + [f"<img_{i:05d}>" for i in range(4)])
    return tok


@pytest.fixture(scope="session")
def tiny_pipeline():
    from seedstory.pipeline import SeedStoryPipeline

    return SeedStoryPipeline.from_preset("tiny")


@pytest.fixture
def opening_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))


# -- the web app as a real server (tests/test_app_api.py, tests/test_browser.py) ----------------------
APP_START_TIMEOUT_S = 180  # imports and the tiny preset load in about 15 s on a loaded 2-core machine


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp(str):
    """The app's URL, with ``log``: the path of the server's output."""

    def __new__(cls, url, log):
        made = super().__new__(cls, url)
        made.log = log
        return made


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """``python app.py --preset tiny`` on a free port, started once per test session; yields its URL.
    The server is always killed at the end (its output goes to a log file shown on failure to start)."""
    import subprocess
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    logdir = tmp_path_factory.mktemp("app-server")
    log_path = logdir / "server.log"
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(logdir / "gradio-tmp"), SEEDSTORY_AUTOSAVE_DIR=str(logdir / "autosave"))
    # The server shares the CPUs with pytest and the browser: one torch thread avoids oversubscription,
    # which makes the tiny model several times slower on a busy 2-core machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--preset", "tiny"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def stop_server():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        log.close()

    try:
        deadline = time.monotonic() + APP_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode} before serving:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer on {url} within {APP_START_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield ServedApp(url, log_path)
    finally:
        stop_server()



@pytest.fixture(scope="session")
def png_bomb():
    """``png_bomb(width, height, mode="RGB") -> bytes``: a tiny valid PNG whose header claims width x height
    pixels, as a decompression bomb's does (a 16x16 picture with its IHDR patched, CRC fixed)."""
    import io
    import struct
    import zlib

    from PIL import Image

    def make(width: int, height: int, mode: str = "RGB") -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (16, 16)).save(buf, format="PNG")
        data = bytearray(buf.getvalue())
        assert data[12:16] == b"IHDR"
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
        return bytes(data)

    return make
