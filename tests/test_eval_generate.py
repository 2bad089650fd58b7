"""``python -m seedstory.eval generate``: stories from the first frame of each validation story (tiny preset)."""
import json
import os

import pytest
import torch
from PIL import Image

from seedstory.eval.__main__ import main
from seedstory.eval.generate import read_val, story_length, story_seed
from seedstory.eval.judge import discover_stories, load_frames
from seedstory.storage import load_story, save_story


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model is faster on one thread than on a shared, busy CPU with several.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (48, 40), (220, 120, 30)).save(images / "fox.png")
    Image.new("RGB", (40, 48), (30, 90, 200)).save(images / "sea.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    lines = [
        {"id": "fox story", "images": ["fox.png", "fox2.png"], "captions": ["A fox finds a key.", "It runs."]},
        {"images": ["sea.jpg"], "captions": ["  The sea was calm that morning.  "]},
        {"images": ["missing.png"], "captions": ["Nobody drew this."]},
        {"images": ["fox.png"], "captions": ["   "]},
        {"images": ["broken.png"], "captions": ["A broken picture."]},
        {"captions": ["No pictures at all."]},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n"
    (root / "val.jsonl").write_text(text)
    return root


def run(val, out, *extra):
    return main(["generate", "--val", str(val / "val.jsonl"), "--images", str(val / "images"), "--out", str(out),
                 "--preset", "tiny", "--frames", "2", "--no-progress", *extra])


def test_read_val_reports_each_bad_line(val):
    items, problems = read_val(str(val / "val.jsonl"), str(val / "images"))
    assert [(i.id, i.caption) for i in items] == [("fox_story", "A fox finds a key."),
                                                  ("val_1", "The sea was calm that morning.")]
    kinds = sorted(reason.split(":")[0] for _, reason in problems)
    assert kinds == ["image missing", "image unreadable", "invalid JSON", "no caption", "no image"]
    assert {line for line, _ in problems} == {3, 4, 5, 6, 7}


def test_generate_then_resume(val, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run(val, out) == 0
    captured = capsys.readouterr()
    assert "made 2" in captured.out and "5 bad line(s)" in captured.out
    assert "image missing" in captured.err and "line 3" in captured.err
    assert sorted(os.listdir(out)) == ["fox_story", "val_1"]
    for name, opening in (("fox_story", "A fox finds a key."), ("val_1", "The sea was calm that morning.")):
        tree = load_story(str(out / name))
        path = tree.path()
        assert len(path) == 3 and path[0].text == opening and path[0].origin == "opening"
        assert all(f.image is not None for f in path)
        assert path[1].seed == story_seed(42, name)  # the tiny preset's seed plus the id's hash
    # the judge reads what generate writes
    found = discover_stories(str(out))
    assert [n for n, _ in found] == ["fox_story", "val_1"]
    assert len(load_frames(found[0][1], "fox_story").frames) == 3

    stamp = os.path.getmtime(out / "val_1" / "story.json")
    short = load_story(str(out / "fox_story"))  # a shorter story where a complete one should be
    short.delete(short.path()[-1].id)
    save_story(short, str(out / "fox_story"))
    assert story_length(str(out / "fox_story")) == 2
    assert run(val, out) == 0
    assert "made 1 now, 1 were already there" in capsys.readouterr().out
    assert os.path.getmtime(out / "val_1" / "story.json") == stamp
    assert len(load_story(str(out / "fox_story")).path()) == 3

    assert run(val, out) == 0  # all complete: nothing to make, no model loaded
    assert "made 0 now, 2 were already there" in capsys.readouterr().out


def test_more_frames_than_the_preset_allows(val, tmp_path, capsys):
    assert run(val, tmp_path / "g", "--frames", "50", "--limit", "1") == 2
    assert "limit of" in capsys.readouterr().err
