"""The app as a Hugging Face Space serves it: the model from ``SEEDSTORY_PRESET``, its weights fetched at start-up
(``SEEDSTORY_DOWNLOAD=1``) into the persistent storage, ZeroGPU's decorator on the model calls when the
``spaces`` package is there (tests/fake_spaces), against the stand-in Hub (tests/hub_standin.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, _free_port
from test_download import LLAMA, _repos
from hub_standin import HubStandIn


def test_serve_options_read_the_spaces_settings(tmp_path):
    from seedstory.space import serve_options, wants_download

    storage = tmp_path / "data"
    storage.mkdir()
    space = {"SPACE_ID": "someone/seed-story", "SEEDSTORY_PRESET": "seed-story-george", "SEEDSTORY_DOWNLOAD": "1",
             "SEEDSTORY_PERSISTENT_DIR": str(storage), "SPACES_ZERO_GPU": "true"}
    opts = serve_options(env=space)
    assert (opts.preset, opts.download, opts.on_space, opts.zero_gpu) == ("seed-story-george", True, True, True)
    assert opts.release_root == str(storage / "pretrained")
    # Without persistent storage the preset's own folder; an explicit root always wins; off the Space, no change.
    assert serve_options(env={**space, "SEEDSTORY_PERSISTENT_DIR": str(tmp_path / "none")}).release_root is None
    assert serve_options(env={**space, "SEEDSTORY_RELEASE_ROOT": "/w"}).release_root == "/w"
    assert serve_options(env={"SEEDSTORY_PERSISTENT_DIR": str(storage)}).overrides == []
    assert serve_options("tiny", env=space).preset == "tiny"
    assert serve_options(env={"SEEDSTORY_SET": "runtime.llm_quantization=8bit  runtime.cpu_offload=true"}).overrides \
        == ["runtime.llm_quantization=8bit", "runtime.cpu_offload=true"]
    assert wants_download(["--download"], {}) and wants_download([], {"SEEDSTORY_DOWNLOAD": "yes"})
    assert not wants_download([], {"SEEDSTORY_DOWNLOAD": "0"})


def test_gpu_decorator_is_zerogpus_with_a_duration_per_frame_or_nothing(tmp_path, monkeypatch):
    from seedstory.space import ZERO_GPU_MAX_SECONDS, gpu, gpu_seconds

    def frames(n):
        yield from range(n)

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed
    assert gpu()(frames) is frames
    monkeypatch.delitem(sys.modules, "spaces")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests", "fake_spaces"))
    log = tmp_path / "gpu.jsonl"
    monkeypatch.setenv("FAKE_SPACES_LOG", str(log))
    wrapped = gpu(frames=lambda n: n)(frames)
    assert list(wrapped(3)) == [0, 1, 2] and list(wrapped(1000)) == list(range(1000))
    got = [json.loads(line)["duration"] for line in log.read_text().splitlines()]
    assert got == [gpu_seconds(3), ZERO_GPU_MAX_SECONDS] and gpu_seconds(3) > gpu_seconds(1)


def test_the_first_screen_shows_the_fetch_then_the_model(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from seedstory import app_logic
    from seedstory.config import PresetError
    from seedstory.holder import ModelHolder
    from seedstory.space import serve_options

    fake, repos, _ = _repos(tmp_path)
    storage = tmp_path / "data"
    storage.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        env = {"SPACE_ID": "someone/seed-story", "SEEDSTORY_PRESET": fake["preset_path"], "SEEDSTORY_DOWNLOAD": "1",
               "SEEDSTORY_PERSISTENT_DIR": str(storage)}
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        opts = serve_options(env=env)
        holder = ModelHolder(opts.preset, opts.overrides)
        thread = holder.fetch_in_background()
        # Until the weights are in: the progress on the first screen, a clear message for a model call.
        assert "fetching the weights" in app_logic.model_report(holder)
        with pytest.raises(PresetError, match="still being fetched"):
            holder.pipeline()
        thread.join(timeout=120)
    assert holder.loaded, holder.error
    assert "fake-george on cpu" in app_logic.model_report(holder)
    assert (storage / "pretrained" / "seed_story" / "george_sft" / "pytorch_model.bin").is_file()


def test_a_failed_fetch_is_shown_with_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from seedstory import app_logic
    from seedstory.holder import ModelHolder

    fake, repos, _ = _repos(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        holder = ModelHolder(fake["preset_path"], [f"release.root={tmp_path / 'dl'}"])
        holder.fetch_in_background().join(timeout=60)
    report = app_logic.model_report(holder)
    assert not holder.loaded and "meta-llama/Llama-2-7b-hf is gated" in report and "HF_TOKEN" in report


def test_app_on_a_zerogpu_space_fetches_the_weights_and_serves(tmp_path):
    """``python app.py`` with a Space's settings: the weights land in the persistent storage, the story runs, and
    every model call went through ZeroGPU's decorator with a duration for its frames."""
    from gradio_client import Client, handle_file

    from seedstory.space import gpu_seconds

    fake, repos, _ = _repos(tmp_path)
    storage = tmp_path / "data"
    storage.mkdir()
    log = tmp_path / "gpu.jsonl"
    port = _free_port()
    with HubStandIn(repos, gated=[LLAMA]) as hub:
        env = dict(os.environ, SPACE_ID="someone/seed-story", SEEDSTORY_PRESET=fake["preset_path"],
                   SEEDSTORY_DOWNLOAD="1", SEEDSTORY_PERSISTENT_DIR=str(storage), SPACES_ZERO_GPU="true",
                   HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, FAKE_SPACES_LOG=str(log),
                   PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "fake_spaces"),
                                               os.environ.get("PYTHONPATH", "")]),
                   GRADIO_SERVER_PORT=str(port), GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
                   SEEDSTORY_AUTOSAVE_DIR=str(tmp_path / "autosave"), OMP_NUM_THREADS="1")
        env.pop("HF_HUB_OFFLINE", None)
        out = open(tmp_path / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url, deadline, client = f"http://127.0.0.1:{port}/", time.monotonic() + 180, None
            while client is None:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    client = Client(url, verbose=False)
                except Exception:  # noqa: BLE001 - not serving yet
                    time.sleep(1)
            while True:  # model calls say "still being fetched" until the weights are in and loaded
                try:
                    client.predict(image=handle_file(os.path.join(ROOT, "assets", "examples", "robot_night.png")),
                                   text="A small robot looked up.", api_name="/start_story")
                    break
                except Exception as e:  # noqa: BLE001
                    assert "still being fetched" in str(e) or "not loaded" in str(e), str(e)
                    assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                    time.sleep(1)
            board, *_ = client.predict(n=2, api_name="/next_frames")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            out.close()
    assert len(board) == 3
    assert (storage / "pretrained" / "cvlm_llama2_tokenizer" / "tokenizer.model").is_file()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"fn": "start_story", "duration": gpu_seconds(1)} in calls
    assert {"fn": "next_frame", "duration": gpu_seconds(2)} in calls
