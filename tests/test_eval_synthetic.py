"""The synthetic-world story analyzer: it must score the world's own stories ~100%, catch deliberately
corrupted frames, read saved stories, and run the stage-1 reconstruction check."""
import json
import os

import numpy as np
import pytest
import torch

from PIL import Image

from seedstory.data import synthetic as S
from seedstory.data import world as W
from seedstory.data.story_state import StoryState
from seedstory.eval import synthetic as E
from seedstory.storage import save_story
from seedstory.story import Frame, StoryTree


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    S.write_dataset(str(out), 8, frames=10, size=128, seed=11, val_fraction=0.0, workers=1, progress=False)
    return str(out / "train.jsonl"), str(out / "images")


@pytest.fixture(scope="module")
def stories(world_data):
    return list(E.dataset_stories(*world_data))


def _save(frames, path):
    tree = StoryTree()
    parent = None
    for k, (text, image) in enumerate(frames):
        f = tree.add(Frame(id=tree.new_id(), parent=parent, text=text, image=image,
                           origin="opening" if k == 0 else "generated"))
        parent = f.id
    save_story(tree, str(path))


def test_ground_truth_scores_at_least_98_percent(stories):
    report = E.analyze((n, fr) for n, fr, _ in stories)
    overall = report.overall()
    for metric in E.METRICS:
        assert overall[metric] >= 0.98, (metric, report.markdown())
    assert overall["blank_picture"] == 0.0 and overall["empty_caption"] == 0.0
    counts = report.totals()
    assert counts["caption_validity"][1] == counts["story_logic"][1] == 8 * 9  # every frame after the opening
    assert counts["character_consistency"][1] > 8 * 9  # one per figure drawn, usually several a frame
    assert counts["presence"][1] > 8 * 9  # one per character present, usually several a frame


def test_corrupted_frames_are_caught(world_data):
    result = E.self_check(*world_data, stories=8, seed=3)
    assert min(result["ground_truth"].values()) >= 0.98
    caught = result["corruptions_caught"]
    assert set(caught) == {"character_consistency", "setting_consistency", "caption_agreement", "caption_validity",
                           "presence", "story_logic"}
    for metric, c in caught.items():
        assert c["tried"] >= 6 and c["caught"] == c["tried"], (metric, c)


def test_each_metric_flags_the_right_frame(stories):
    world = S.world_json()
    name, frames, truths = stories[0]
    rng = np.random.default_rng(0)
    i = 4
    broken = list(frames)
    broken[i] = (frames[i][0], E.change_setting(frames[i][1], truths[i], world, rng, avoid=[truths[i - 1]["setting"]]))
    score = E.score_story(name, broken, world)
    assert (i, "setting_consistency") in {(f, m) for f, m, _ in score.problems}
    assert score.rate("setting_consistency") < 1.0

    broken = list(frames)
    last = len(frames) - 1  # the story so far cannot be read past a garbled caption: take the last one
    broken[last] = ("Then the moon ate a sandwich.", frames[last][1])
    score = E.score_story(name, broken, world)
    assert {(f, m) for f, m, _ in score.problems} - {(last, "presence")} == {(last, "caption_validity")}
    assert score.rate("caption_validity") == pytest.approx(8 / 9)

    # the opening is the user's: a bad opening caption is not the model's fault
    broken = list(frames)
    broken[0] = ("zorp", frames[0][1])
    assert E.score_story(name, broken, world).rate("caption_validity") == 1.0


def test_presence_and_story_logic_flag_the_right_frame(stories):
    """A character the story says is there but left out of the picture, a blank picture, and a caption that
    cannot happen next: each is caught on its own frame, and nothing else in the story is."""
    world = S.world_json()
    rng = np.random.default_rng(1)
    name, frames, truths = next(s for s in stories if all(t["characters"] for t in s[2]))
    i = 5
    missing = list(frames)
    missing[i] = (frames[i][0], E.without_character(truths[i], rng))
    score = E.score_story(name, missing, world)
    assert [(f, m) for f, m, _ in score.problems if m == "presence"] == [(i, "presence")]
    assert "is there but not drawn" in score.problems[[m for _, m, _ in score.problems].index("presence")][2]

    blank = list(frames)
    blank[i] = (frames[i][0], Image.new("RGB", (128, 128), (128, 128, 128)))
    score = E.score_story(name, blank, world)
    assert score.per_frame[i]["presence"] == [0, len(truths[i]["characters"])]
    assert score.counts["blank_picture"] == (1, 9)

    i = len(frames) - 1  # the last frame: an impossible caption in its place changes no later state
    state = StoryState.opening(frames[0][0])
    for caption, _ in frames[1:i]:
        state.read(caption)
    absent = next(c for c in W.CHARACTERS if c not in state.present)
    wrong = list(frames)
    wrong[i] = (f"{absent} leaves.", frames[i][1])
    score = E.score_story(name, wrong, world)
    logic = [(f, w) for f, m, w in score.problems if m == "story_logic"]
    assert logic == [(i, f"{absent} is not there")]
    assert score.rate("caption_validity") == 1.0  # well-formed, just impossible


def test_a_story_going_round_in_circles_is_a_loop(stories):
    """A story that cycles through five captions (what a guard against repeating the last four lets through)
    shows as looped from its sixth frame on; the ground truth barely repeats itself."""
    world = S.world_json()
    name, frames, _ = stories[0]
    cycle = [frames[1 + k % 5][0] for k in range(len(frames) - 1)]
    circling = [frames[0]] + [(text, image) for text, (_, image) in zip(cycle, frames[1:])]
    score = E.score_story(name, circling, world)
    looped = score.counts["looped_caption"]
    assert looped == (len(frames) - 1 - 5, len(frames) - 1)
    assert score.counts["repeated_caption"][0] == 0  # never the previous caption: only the wider sign sees it
    truth = E.analyze((n, fr) for n, fr, _ in stories).overall()
    assert truth["looped_caption"] <= 0.1
    # a cycle of eight distinct captions (the agent's whole window) is a loop too
    distinct = list(dict.fromkeys(t for _, fr, _ in stories for t, _ in fr[1:]))[:8]
    eight = [frames[0]] + [(distinct[k % 8], image) for k, (_, image) in enumerate(frames[1:])]
    assert E.score_story(name, eight, world).counts["looped_caption"] == (len(frames) - 1 - 8, len(frames) - 1)


def test_reading_saved_stories_from_the_cli(stories, tmp_path, capsys):
    root = tmp_path / "stories"
    root.mkdir()
    (name_a, frames_a, _), (name_b, frames_b, _) = stories[:2]
    _save(frames_a, root / name_a)
    swapped = list(frames_b)
    swapped[3] = (frames_a[5][0], frames_b[3][1])  # another story's caption: names what is not drawn
    _save(swapped, root / f"{name_b}.zip")
    out = tmp_path / "result.json"
    assert E.main(["--out", str(out), "stories", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "2 stories, 18 frames analysed" in printed and "caption agreement" in printed
    result = json.loads(out.read_text())
    per = {s["name"]: s for s in result["per_story"]}
    assert per[name_a]["caption_agreement"] == 1.0 and per[name_a]["problems"] == []
    assert any(p["frame"] == 3 for p in per[name_b]["problems"])
    assert set(result["targets"]) == set(E.METRICS) | {"blank_picture"}
    assert result["targets"]["blank_picture"]["at_most"] and result["targets"]["blank_picture"]["met"]

    from seedstory.eval.__main__ import main as eval_main

    assert eval_main(["synthetic", "--json", "stories", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["stories"] == 2
    assert E.main(["stories", str(tmp_path / "nowhere")]) == 1


def test_reconstruction_check_runs_on_the_tiny_preset(world_data):
    result = E.reconstruct(*world_data, preset="tiny", frames=3, progress=False)
    assert result["frames"] == 3
    for key in ("scene_exact", "setting", "characters"):
        assert 0.0 <= result[key] <= 1.0
    # a random model redraws nothing of the scene: every frame is an example of a miss
    assert result["scene_exact"] == 0.0 and len(result["examples"]) == 3


def test_redrawn_scenes_count_the_props_held_and_lying(stories):
    """The tally behind roundtrip / reconstruct / predict: the true pictures keep every prop; the same pictures
    with each prop painted over in its surroundings' colour keep none (characters untouched)."""
    frames = [(im, t) for _, fr, truths in stories for (_, im), t in zip(fr, truths)
              if t["props"] or any(c["holding"] for c in t["characters"])][:12]
    true, wiped = E._SceneTally(None), E._SceneTally(None)
    for k, (im, t) in enumerate(frames):
        true.add(str(k), im, t)
        arr = np.asarray(im).copy()
        for name in W.PROP_NAMES:  # every pixel of a prop's colour becomes the pixel just below the frame's middle
            mask = (np.abs(arr.astype(int) - W.COLOURS[W.PROPS[name]["colour"]]).sum(-1) < 40)
            arr[mask] = arr[-3, 2]
        wiped.add(str(k), Image.fromarray(arr), t)
    assert true.result()["held_props"] == 1.0 and true.result()["ground_props"] == 1.0
    assert wiped.result()["held_props"] == 0.0 and wiped.result()["ground_props"] == 0.0
    assert wiped.result()["characters"] == 1.0


def test_vae_roundtrip_check_runs_on_the_tiny_preset(world_data, capsys):
    result = E.roundtrip(*world_data, preset="tiny", frames=2, progress=False)
    assert result["frames"] == 2 and result["scene_exact"] == 0.0  # an untrained VAE keeps nothing
    # the demo's trained VAE gives back every setting and character of its world's pictures
    demo = E.roundtrip(*world_data, preset="demo", frames=6, progress=False)
    assert demo["setting"] == 1.0 and demo["characters"] == 1.0
    jsonl, images = world_data
    assert E.main(["roundtrip", jsonl, "--images", images, "--preset", "tiny", "--frames", "1"]) == 0
    assert "1 frames round-tripped" in capsys.readouterr().out


def test_the_apps_world_examples_are_faithful_openings():
    """The demo's examples in the app are the synthetic world's openings: each caption parses and says what the
    picture shows."""
    from seedstory.app_logic import examples

    world_examples = examples("demo")
    assert len(world_examples) >= 3 and all(os.path.basename(p).startswith("world_") for p, _ in world_examples)
    from PIL import Image

    for path, text in world_examples:
        with Image.open(path) as im:
            scene = S.detect(im.convert("RGB"))
        assert S.parse_caption(text) is not None, text
        assert S.caption_agrees(text, scene) == [], (path, text)


def test_next_frame_check_runs_on_the_tiny_preset(world_data):
    result = E.predict(*world_data, preset="tiny", frames=3, window=2, progress=False)
    assert result["frames"] == 3
    assert result["scene_exact"] == 0.0 and len(result["examples"]) == 3
    # an opening is never predicted: every example is a later frame of its story
    assert all(int(e["frame"].rsplit("/", 1)[1]) >= 1 for e in result["examples"])
    with pytest.raises(ValueError, match="window"):
        E.predict(*world_data, preset="tiny", frames=1, window=0, progress=False)
    jsonl, images = world_data
    assert E.main(["predict", jsonl, "--images", images, "--preset", "tiny", "--frames", "1", "--window", "1"]) == 0


def test_predicted_features_come_from_the_story_so_far(world_data):
    """Teacher-forced features depend on the frames before the predicted one, and match the agent's shape."""
    from seedstory.pipeline import SeedStoryPipeline

    pipe = SeedStoryPipeline.from_preset("tiny")
    _, frames, _ = next(E.dataset_stories(*world_data))
    caps, ims = [c for c, _ in frames[:3]], [im for _, im in frames[:3]]
    a = E.predicted_features(pipe, caps, ims)
    b = E.predicted_features(pipe, caps, [ims[1], ims[0], ims[2]])
    assert a.shape == pipe.encode_image(ims[0]).shape
    assert not torch.allclose(a, b)


def test_teacher_forced_logic_judges_each_next_caption_against_the_true_story(world_data, monkeypatch):
    from seedstory.engine import StoryEngine

    result = E.logic(*world_data, "tiny", stories=2, frames=4, progress=False)
    assert result["captions"] == 2 * 3 and result["judged"] + result["unparsed"] == 6
    jsonl, images = world_data
    _, frames, truths = next(E.dataset_stories(jsonl, images, 1, 6))
    captions = [c for c, _ in frames]
    seen = []

    def true_next(self, tree, frame_id, seed, settings=None):
        path = tree.path(frame_id)
        # the engine holds the real story so far: its own pictures and captions, frame by frame
        seen.append([f.text for f in path])
        return captions[len(path)]

    monkeypatch.setattr(StoryEngine, "draft_text", true_next)
    result = E.logic(jsonl, images, "tiny", stories=1, frames=6, progress=False)
    assert result["story_logic"] == 1.0 and result["judged"] == 5
    assert seen == [captions[:k] for k in range(1, 6)]
    rng = np.random.default_rng(0)
    monkeypatch.setattr(StoryEngine, "draft_text",
                        lambda self, tree, frame_id, seed, settings=None: E.impossible_caption(
                            truths[len(tree.path(frame_id)) - 1], rng))
    result = E.logic(jsonl, images, "tiny", stories=1, frames=6, progress=False)
    assert result["story_logic"] == 0.0 and result["judged"] == 5 and result["problems"]
    assert E.main(["logic", jsonl, "--images", images, "--preset", "tiny", "--stories", "1", "--frames", "2"]) == 0
