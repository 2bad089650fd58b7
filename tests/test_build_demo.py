"""`python -m training.build_demo`, the one command that rebuilds the shipped demo model: every stage runs
from the committed demo configs (one step each here), the result loads, and a re-run skips finished work."""
import glob
import json
import os

import torch
from safetensors import safe_open

from seedstory.config import REPO_ROOT
from seedstory.engine import StoryEngine
from training import build_demo


def test_stages_keep_large_blocks_in_the_heap_unless_the_user_chose(monkeypatch):
    seen = []
    monkeypatch.setattr(build_demo.subprocess, "run", lambda cmd, **kw: seen.append(kw["env"]))
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    build_demo.run(["true"])
    env = seen[0]
    assert env["MALLOC_MMAP_THRESHOLD_"] == build_demo.MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == build_demo.MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert env["MALLOC_TOP_PAD_"] == "0"  # the user's own setting wins
    assert env["PATH"] == os.environ["PATH"]


def test_build_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    from seedstory.pipeline import SeedStoryPipeline

    quick = []
    for stage, *_ in build_demo.STAGES:
        quick += [f"{stage}.train.max_steps=1", f"{stage}.train.batch_size=2", f"{stage}.data.num_workers=0",
                  f"{stage}.log_with=[]"]
    args = ["--data", str(tmp_path / "world"), "--stories", "3", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "model"), "--set", *quick]
    out = build_demo.main(args)

    timings = json.loads((tmp_path / "work" / "build_timings.json").read_text())
    assert {"data", "tokenizer", "total"} | {s for s, *_ in build_demo.STAGES} <= set(timings)
    for stage, *_ in build_demo.STAGES:
        assert (tmp_path / "work" / stage / "final" / "seedstory.json").is_file()
    # Stage 3 joins stage 2's agent with stage 1's de-tokenizer.
    assert "model.detokenizer_from=" + str(tmp_path / "work" / "stage1" / "final") in capsys.readouterr().out

    files = glob.glob(os.path.join(out, "**", "*.safetensors"), recursive=True)
    assert {os.path.relpath(f, out).split(os.sep)[0] for f in files} == {"agent", "detokenizer", "visual_tokenizer"}
    for f in files:  # published in fp16: half the size
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}, f
    configs = glob.glob(os.path.join(out, "**", "config.json"), recursive=True)
    assert configs and not [c for c in configs if str(tmp_path) in open(c).read()]  # no build-machine paths

    pipe = SeedStoryPipeline.from_pretrained(out, device="cpu", torch_dtype=torch.float32)
    pipe.settings.num_inference_steps = 2
    engine = StoryEngine(pipe)
    opening = os.path.join(REPO_ROOT, "assets", "examples", "world_beach.png")
    tree = engine.start(opening, "It is a bright day on the beach. Moss stands on the left with the kite.")
    frame = engine.step(tree)
    assert frame.image.size == (128, 128)  # the demo configs' frame size

    build_demo.main(args)  # everything exists: nothing is trained again
    again = capsys.readouterr().out
    assert all(f"{stage}: done" in again for stage, *_ in build_demo.STAGES)
    assert set(json.loads((tmp_path / "work" / "build_timings.json").read_text())) == {"total"}
