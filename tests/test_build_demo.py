"""`python -m training.build_demo`, the one command that rebuilds the shipped demo model: every stage runs
from the committed demo configs (one step each here), the result loads, and a re-run skips finished work."""
import glob
import json
import os
import sys
import time

import pytest

import torch
from safetensors import safe_open

from seedstory.config import REPO_ROOT, GenerationSettings, load_preset
from seedstory.engine import StoryEngine
from training import build_demo


def test_stages_keep_large_blocks_in_the_heap_unless_the_user_chose(monkeypatch):
    seen = []
    monkeypatch.setattr(build_demo.subprocess, "run", lambda cmd, **kw: seen.append(kw["env"]))
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    build_demo.run(["true"])
    env = seen[0]
    assert env["MALLOC_MMAP_THRESHOLD_"] == build_demo.MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == build_demo.MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert env["MALLOC_TOP_PAD_"] == "0"  # the user's own setting wins
    assert env["PATH"] == os.environ["PATH"]
    assert "OMP_WAIT_POLICY" not in env  # a stage alone keeps OpenMP's default
    assert build_demo.stage_env(shared_cpu=True)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert build_demo.stage_env(shared_cpu=True)["OMP_WAIT_POLICY"] == "ACTIVE"


def _stage(tmp_path, name, seconds, code=0):
    """A stand-in stage: records when it ran, in seconds since the epoch, then exits with ``code``."""
    script = (f"import time, sys; t = time.time(); time.sleep({seconds}); print('{name} step 3/3', flush=True); "
              f"open(r'{tmp_path / name}.ran', 'w').write(f'{{t}} {{time.time()}}'); sys.exit({code})")
    return [sys.executable, "-c", script]


def _span(tmp_path, name):
    return tuple(map(float, (tmp_path / f"{name}.ran").read_text().split()))


def test_stages_that_do_not_need_each_other_run_side_by_side(tmp_path, monkeypatch):
    seen_env = []
    popen = build_demo.subprocess.Popen

    def spy(cmd, **kw):
        seen_env.append(kw["env"])
        return popen(cmd, **kw)

    monkeypatch.setattr(build_demo.subprocess, "Popen", spy)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    commands = {"a": _stage(tmp_path, "a", 0.3), "b": _stage(tmp_path, "b", 1.0), "c": _stage(tmp_path, "c", 1.0),
                "d": _stage(tmp_path, "d", 0.1)}
    needs = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    timings = {}
    build_demo.run_stages(commands, needs, 2, str(tmp_path / "work"), timings)

    a, b, c, d = (_span(tmp_path, n) for n in "abcd")
    assert a[1] <= b[0] and a[1] <= c[0]          # b and c wait for a ...
    assert b[0] < c[1] and c[0] < b[1]            # ... and run at the same time
    assert d[0] >= max(b[1], c[1])                # d waits for both
    assert set(timings) == set("abcd") and timings["b"] >= 1.0
    # side by side, each writes to its own log with OpenMP's threads told to sleep, not spin, while waiting
    assert "b step 3/3" in (tmp_path / "work" / "b.log").read_text()
    assert build_demo.last_progress(str(tmp_path / "work" / "c.log")) == "c step 3/3"
    assert not (tmp_path / "work" / "a.log").exists() and not (tmp_path / "work" / "d.log").exists()
    assert [env.get("OMP_WAIT_POLICY") for env in seen_env] == [None, "PASSIVE", "PASSIVE", None]

    for name in "abcd":
        (tmp_path / f"{name}.ran").unlink()
    build_demo.run_stages(commands, needs, 1, str(tmp_path / "work1"), {})  # --jobs 1: one after the other
    b, c = _span(tmp_path, "b"), _span(tmp_path, "c")
    assert b[1] <= c[0]
    assert all("OMP_WAIT_POLICY" not in env for env in seen_env[4:])


def test_a_failed_stage_stops_the_build_and_the_stage_beside_it(tmp_path):
    commands = {"a": _stage(tmp_path, "a", 0.0, code=3), "b": _stage(tmp_path, "b", 30.0), "c": _stage(tmp_path, "c", 0)}
    needs = {"a": set(), "b": set(), "c": {"a"}}
    start = time.time()
    with pytest.raises(RuntimeError, match=r"a failed \(exit status 3\).*a\.log"):
        build_demo.run_stages(commands, needs, 2, str(tmp_path / "work"), {})
    assert time.time() - start < 20  # b was stopped, not waited for
    assert not (tmp_path / "b.ran").exists() and not (tmp_path / "c.ran").exists()


def test_build_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    from seedstory.pipeline import SeedStoryPipeline

    quick = []
    for stage, *_ in build_demo.STAGES:
        quick += [f"{stage}.train.max_steps=1", f"{stage}.train.batch_size=2", f"{stage}.data.num_workers=0",
                  f"{stage}.log_with=[]"]
    quick += ["stage2c.corrected.stories=2", "stage2c.corrected.frames=3", "stage2c.corrected.workers=1"]
    args = ["--data", str(tmp_path / "world"), "--stories", "3", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "model"), "--set", *quick]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("# the model card\n")
    out = build_demo.main(args)
    assert (tmp_path / "model" / "README.md").read_text() == "# the model card\n"  # kept beside the new weights

    timings = json.loads((tmp_path / "work" / "build_timings.json").read_text())
    assert {"data", "tokenizer", "total"} | {s for s, *_ in build_demo.STAGES} <= set(timings)
    for stage, *_ in build_demo.STAGES:
        assert (tmp_path / "work" / stage / "final" / "seedstory.json").is_file()
    # Stage 2 joins stage 2t's agent with stage 0b's visual tokenizer; stage 2c goes on from stage 2 on its own
    # corrected stories mixed with the true ones; stage 3 joins stage 2c's agent with stage 1's de-tokenizer.
    printed = capsys.readouterr().out
    assert "model.agent_from=" + str(tmp_path / "work" / "stage2t" / "final") in printed
    assert "model.detokenizer_from=" + str(tmp_path / "work" / "stage1" / "final") in printed
    assert "model.pretrained=" + str(tmp_path / "work" / "stage2c" / "final") in printed
    corrected = [json.loads(line) for line in open(tmp_path / "work" / "stage2c" / "corrected.jsonl")]
    true = [json.loads(line) for line in open(tmp_path / "world" / "train.jsonl")]
    assert [r["id"] for r in corrected] == ["corrected_" + r["id"] for r in true[:2]]
    assert all(len(r["captions"]) == 3 and r["captions"][0] == t["captions"][0] for r, t in zip(corrected, true))
    for r in corrected:
        assert all((tmp_path / "world" / "images" / rel).is_file() for rel in r["images"])
    mixed = [json.loads(line)["id"] for line in open(tmp_path / "work" / "stage2c" / "train_mix.jsonl")]
    assert sorted(mixed) == sorted([r["id"] for r in corrected] + [r["id"] for r in true])

    files = glob.glob(os.path.join(out, "**", "*.safetensors"), recursive=True)
    assert {os.path.relpath(f, out).split(os.sep)[0] for f in files} == {"agent", "detokenizer", "visual_tokenizer",
                                                                          "familiarity.safetensors"}
    for f in files:  # published in fp16: half the size (the small familiarity statistics stay fp32)
        if f.endswith("familiarity.safetensors"):
            continue
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}, f
    configs = glob.glob(os.path.join(out, "**", "config.json"), recursive=True)
    assert configs and not [c for c in configs if str(tmp_path) in open(c).read()]  # no build-machine paths

    pipe = SeedStoryPipeline.from_pretrained(out, device="cpu", torch_dtype=torch.float32)
    # the folder paints as the demo preset does: `--preset <folder>` is not a weaker model
    assert pipe.settings == GenerationSettings.from_config(load_preset("demo").generation)
    pipe.settings.num_inference_steps = 2
    engine = StoryEngine(pipe)
    opening = os.path.join(REPO_ROOT, "assets", "examples", "world_beach.png")
    tree = engine.start(opening, "It is a bright day on the beach. Bodo stands on the left with the apple.")
    frame = engine.step(tree)
    assert frame.image.size == (128, 128)  # the demo configs' frame size

    build_demo.main(args)  # everything exists: nothing is trained again
    again = capsys.readouterr().out
    assert all(f"{stage}: done" in again for stage, *_ in build_demo.STAGES)
    # stages 0 and 2t need nothing, so they start side by side, each writing its own log
    assert (tmp_path / "work" / "stage0.log").is_file() and (tmp_path / "work" / "stage2t.log").is_file()
    assert set(json.loads((tmp_path / "work" / "build_timings.json").read_text())) == {"total"}


def test_until_builds_a_stage_and_those_it_needs_then_stops(tmp_path, monkeypatch):
    """``--until stage1``: stages 0, 0b and 1 are started, none after them, and nothing is published; a later
    run without it goes on (each finished stage is skipped)."""
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "train.jsonl").write_text("")
    (tmp_path / "work" / "tokenizer").mkdir(parents=True)
    (tmp_path / "work" / "tokenizer" / "tokenizer.json").write_text("{}")
    started = []
    monkeypatch.setattr(build_demo, "run_stages", lambda commands, *a, **k: started.append(set(commands)))
    monkeypatch.setattr(build_demo, "publish", lambda *a, **k: pytest.fail("published a partial build"))
    args = ["--data", str(tmp_path / "world"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "model")]
    done = build_demo.main(args + ["--until", "stage1"])
    assert started == [{"stage0", "stage0v", "stage1"}] and done == str(tmp_path / "work" / "stage1" / "final")
    assert build_demo.upstream("stage3") == {s for s, *_ in build_demo.STAGES}
    (tmp_path / "work" / "stage0" / "final").mkdir(parents=True)
    (tmp_path / "work" / "stage0" / "final" / "seedstory.json").write_text("{}")
    build_demo.main(args + ["--until", "stage2t"])
    assert started[-1] == {"stage2t"}  # stage 2t reads no picture: it needs no other stage
    build_demo.main(args + ["--until", "stage2"])
    assert started[-1] == {"stage0v", "stage2t", "stage2"}  # stage 0 is built already
