"""bench/bench_demo.py on the shipped demo model and a two-story world: the report, and --text-only."""
import importlib.util
import json
import os

from seedstory.data.synthetic import write_dataset
from seedstory.storage import load_story

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_demo", os.path.join(ROOT, "bench", "bench_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_only_paints_drafts_and_says_so(tmp_path, capsys):
    world = tmp_path / "world"
    write_dataset(str(world), stories=3, frames=4, size=128, seed=2, workers=1, progress=False)
    out = tmp_path / "bench"
    assert load_bench().main(["--val", str(world / "val.jsonl"), "--images", str(world / "images"), "--stories", "1",
                              "--frames", "2", "--out", str(out), "--text-only"]) == 0
    printed = capsys.readouterr().out
    assert "text only: the pictures are 1-step drafts" in printed and "caption validity" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["text_only"] and result["stories"] == 1 and result["counts"]["looped_caption"][1] == 2
    assert "story logic" in printed and "blank picture" in printed
    (story,) = os.listdir(out / "stories")
    tree = load_story(str(out / "stories" / story))
    made = tree.path(tree.current)[1:]
    assert len(made) == 2
    assert all(f.settings["num_inference_steps"] == 1 and f.settings["guidance_scale"] == 1 for f in made)
    # the text comes from the agent's own features, never from a draft read back (the demo reads its pictures)
    assert all(f.settings["context_from"] == "features" for f in made)
    assert all(f.settings["repetition_scope"] == "word_starts" for f in made)  # otherwise the demo preset's own


def test_world_seed_takes_openings_from_an_unseen_world(tmp_path, capsys):
    out = tmp_path / "bench"
    assert load_bench().main(["--world-seed", "3", "--stories", "1", "--frames", "1", "--out", str(out),
                              "--text-only"]) == 0
    assert "presence" in capsys.readouterr().out
    (story,) = os.listdir(out / "stories")
    assert story.startswith("s3_")  # story ids carry their world's seed; the training data is seed 0
    assert (out / "world-seed3" / "val.jsonl").is_file()


def test_an_output_folder_never_mixes_two_runs(tmp_path, capsys):
    world = tmp_path / "world"
    write_dataset(str(world), stories=3, frames=4, size=128, seed=2, workers=1, progress=False)
    out = tmp_path / "bench"
    common = ["--val", str(world / "val.jsonl"), "--images", str(world / "images"), "--stories", "1", "--frames",
              "1", "--out", str(out)]
    bench = load_bench()
    assert bench.main(common + ["--text-only"]) == 0
    assert bench.main(common + ["--text-only"]) == 0  # the same run again: continues (nothing left to make)
    capsys.readouterr()
    assert bench.main(common) == 2  # full pictures into the text-only run's folder
    assert "holds stories of another run (its overrides, text_only differ)" in capsys.readouterr().err
    assert bench.main(common + ["--fresh"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert not result["text_only"] and result["stories"] == 1


def test_a_world_file_left_by_another_version_of_the_world_is_refused_before_any_story(tmp_path, capsys):
    """The analyzer reads pictures by world.json's colours: a stale file (an extra colour here) would misread
    every background, so the bench stops before spending its half hour."""
    world = tmp_path / "world"
    write_dataset(str(world), stories=3, frames=2, size=128, seed=2, workers=1, progress=False)
    stale = json.loads((world / "world.json").read_text())
    stale["colours"]["yellow"] = [250, 220, 40]
    (world / "world.json").write_text(json.dumps(stale))
    out = tmp_path / "bench"
    assert load_bench().main(["--val", str(world / "val.jsonl"), "--images", str(world / "images"), "--stories", "1",
                              "--frames", "1", "--out", str(out), "--text-only"]) == 2
    err = capsys.readouterr().err
    assert "another version of the synthetic world (its colours differ" in err and "seedstory.data.synthetic" in err
    assert not (out / "stories").exists() or not os.listdir(out / "stories")
