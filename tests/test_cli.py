"""``python -m seedstory``: generate, export and presets through ``seedstory.cli.main`` (tiny preset)."""
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from seedstory.cli import main

TEXT = "A fox finds a brass key under the old oak."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def opening_png(workdir):
    rng = np.random.default_rng(1)
    path = workdir / "opening.png"
    Image.fromarray(rng.integers(0, 255, (72, 88, 3), dtype=np.uint8)).save(path)
    return str(path)


def generate(image, out, *extra, frames=2, text=TEXT):
    return main(["generate", "--preset", "tiny", "--image", image, "--text", text, "--frames", str(frames),
                 "--out", str(out), *extra])


def read_story(out):
    with open(os.path.join(out, "story.json")) as f:
        return json.load(f)


def path_frames(meta):
    by_id = {e["id"]: e for e in meta["frames"]}
    return [by_id[i] for i in meta["path"]]


@pytest.fixture(scope="module")
def story_dir(workdir, opening_png):
    out = workdir / "story_a"
    assert generate(opening_png, out, "--seed", "3") == 0
    return str(out)


def test_generate_writes_story_with_pictures(story_dir):
    meta = read_story(story_dir)
    frames = path_frames(meta)
    assert len(frames) == 3  # the opening + 2
    assert frames[0]["parent"] is None and frames[0]["text"] == TEXT
    assert [f["parent"] for f in frames[1:]] == [frames[0]["id"], frames[1]["id"]]
    for f in frames:
        png = os.path.join(story_dir, f["image"])
        assert os.path.isfile(png)
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) >= 8
    assert all(f["seed"] == 3 for f in frames[1:])


def test_same_seed_same_story(story_dir, workdir, opening_png):
    out = workdir / "story_b"
    assert generate(opening_png, out, "--seed", "3") == 0
    a, b = path_frames(read_story(story_dir)), path_frames(read_story(out))
    assert [f["text"] for f in a] == [f["text"] for f in b]
    assert [f["token_ids"] for f in a] == [f["token_ids"] for f in b]
    for fa, fb in zip(a, b):
        with open(os.path.join(story_dir, fa["image"]), "rb") as x, open(os.path.join(out, fb["image"]), "rb") as y:
            assert x.read() == y.read()


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--sink", "--window", "2"], {"window": 2}),
        (["--mode", "recompute", "--window", "2"], {"window": 2}),
        (["--sample", "--seed", "5", "--steps", "1"], {"do_sample": True, "seed": 5, "num_inference_steps": 1}),
        (["--sample", "--no-repeat-captions", "2"], {"do_sample": True, "no_repeat_captions": 2}),
        (["--sample", "--caption-candidates", "3", "--steps", "1"], {"do_sample": True, "caption_candidates": 3}),
        (["--repetition-scope", "words"], {"repetition_scope": "words"}),
        (["--candidates", "2", "--steps", "1"], {"candidates": 2, "num_inference_steps": 1}),
        (["--context-from", "picture", "--steps", "1"], {"context_from": "picture"}),
    ],
    ids=["sink-window2", "recompute-window2", "sample", "no-repeat", "caption-candidates", "scope", "candidates", "context-from"],
)
def test_generate_options(flags, want, workdir, opening_png, capsys):
    out = workdir / ("opt_" + "_".join(f.strip("-") for f in flags))
    assert generate(opening_png, out, *flags, frames=3) == 0  # 3 frames: with window 2, one leaves the context
    assert "wrote 4 frames" in capsys.readouterr().out
    frames = path_frames(read_story(out))
    assert len(frames) == 4
    for f in frames[1:]:
        assert {k: f["settings"][k] for k in want} == want
        assert os.path.isfile(os.path.join(out, f["image"]))


@pytest.fixture(scope="module")
def zip_story(workdir, opening_png):
    out = workdir / "story.zip"
    assert generate(opening_png, out, "--seed", "3", frames=1) == 0
    return out


def test_generate_into_zip(zip_story):
    with zipfile.ZipFile(zip_story) as zf:
        names = set(zf.namelist())
    assert {"story.json", "features.safetensors", "frames/0000.png", "frames/0001.png"} <= names


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-image", "image file not found"),
        ("corrupt-image", "not a readable image"),
        ("empty-text", "text is empty"),
        ("zero-frames", "--frames must be at least 1"),
        ("unknown-preset", "unknown preset 'no-such-preset'"),
    ],
)
def test_generate_errors_exit_2(case, message, workdir, opening_png, capsys):
    image, text, frames, preset = opening_png, TEXT, 2, "tiny"
    if case == "missing-image":
        image = str(workdir / "does-not-exist.png")
    elif case == "corrupt-image":
        image = str(workdir / "corrupt.png")
        with open(image, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not really a picture")
    elif case == "empty-text":
        text = "   "
    elif case == "zero-frames":
        frames = 0
    elif case == "unknown-preset":
        preset = "no-such-preset"
    out = workdir / f"err_{case}"
    code = main(["generate", "--preset", preset, "--image", image, "--text", text, "--frames", str(frames),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_export_formats(story_dir, workdir, capsys):
    outs = {}
    for fmt, ext in [("comic", "png"), ("html", "html"), ("pdf", "pdf"), ("gif", "gif"), ("zip", "zip")]:
        outs[fmt] = str(workdir / f"export.{ext}")
        assert main(["export", story_dir, "--format", fmt, "--out", outs[fmt]]) == 0
        assert f"wrote {outs[fmt]}" in capsys.readouterr().out
    with Image.open(outs["comic"]) as im:
        assert im.format == "PNG" and im.size[0] > 384
    with Image.open(outs["gif"]) as im:
        assert im.format == "GIF" and im.n_frames == 3
    with open(outs["pdf"], "rb") as f:
        data = f.read()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    with open(outs["html"], encoding="utf-8") as f:
        page = f.read()
    assert page.lower().startswith("<!doctype html>") and page.count("<img ") == 3
    with zipfile.ZipFile(outs["zip"]) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
        assert {"frame_000.png", "frame_001.png", "frame_002.png", "story.txt", "story.json"} <= names
        assert len(json.loads(zf.read("story.json"))["frames"]) == 3
        with Image.open(zf.open("frame_001.png")) as im:
            im.verify()


def test_export_default_path_and_from_zip(zip_story, workdir):
    assert main(["export", str(zip_story), "--format", "gif"]) == 0  # default: next to the story
    with Image.open(workdir / "story.gif") as im:
        assert im.n_frames == 2


def test_export_missing_story_exits_2(workdir, capsys):
    assert main(["export", str(workdir / "nothing-here"), "--format", "zip"]) == 2
    assert "no saved story" in capsys.readouterr().err


def test_presets_lists_tiny(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["tiny", "random"] for line in lines)


@pytest.mark.parametrize("bad, message", [
    (["--window", "0"], "at least one frame"),
    (["--steps", "0"], "at least 1"),
    (["--frames", "60"], "limit of 50 frames"),
    (["--set", "temperature=0.5"], "did you mean generation.temperature"),  # would be silently ignored
    (["--set", "dtype=bf16"], "did you mean runtime.dtype"),
])
def test_bad_generation_settings_fail_before_work(workdir, capsys, bad, message):
    opening = workdir / "opening.png"
    if not opening.exists():
        Image.new("RGB", (32, 32), "red").save(opening)
    out = workdir / "never"
    args = ["generate", "--preset", "tiny", "--image", str(opening), "--text", "Hi.", "--frames", "1", "--out", str(out)]
    assert main(args + bad) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generate_refuses_an_out_folder_that_is_not_a_story(workdir, capsys):
    opening = workdir / "opening2.png"
    Image.new("RGB", (32, 32), "blue").save(opening)
    other = workdir / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["generate", "--preset", "tiny", "--image", str(opening), "--text", "Hi.", "--frames", "1",
                 "--out", str(other)]) == 2
    assert "not a saved story" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"


SPY = """
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Spy())
sys.argv = [sys.argv[1], "--help"]
try:
    import importlib
    importlib.import_module(sys.argv[0])
except SystemExit:
    pass
import torch  # noqa: F401 - for an entry point that imports it only when it runs a command
print("torch imported with OMP_WAIT_POLICY =", seen)
"""


@pytest.mark.parametrize("module", ["app", "seedstory.__main__", "seedstory.eval.__main__"])
def test_entry_points_let_idle_openmp_threads_sleep(module):
    """On a busy machine spinning OpenMP threads made a demo frame take 2.8 s instead of 1.1 s: the app, the CLI and
    the eval CLI set OMP_WAIT_POLICY=PASSIVE before torch is imported (a user's own setting wins)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SPY, module], capture_output=True, text=True, cwd=root, timeout=300)
    assert "torch imported with OMP_WAIT_POLICY = ['PASSIVE']" in out.stdout, (out.stdout, out.stderr[-2000:])


def test_a_command_prints_what_its_user_needs(workdir, opening_png):
    """No library notices on a plain run: no torchvision fallback notes, no weights progress bar, no float32 cast
    warning; ``SEEDSTORY_VERBOSE=1`` brings them back."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "seedstory", "generate", "--preset", "tiny", "--image", opening_png, "--text", TEXT,
           "--frames", "1", "--out", str(workdir / "quiet_story")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEEDSTORY_VERBOSE", None)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    noise = ("torchvision", "Loading weights", "kept in float32")
    assert not [n for n in noise if n in out.stderr + out.stdout], out.stderr[-2000:]
    loud = subprocess.run(cmd[:-1] + [str(workdir / "loud_story")], capture_output=True, text=True, cwd=root,
                          timeout=300, env=dict(env, SEEDSTORY_VERBOSE="1"))
    assert loud.returncode == 0 and "torchvision" in loud.stderr
