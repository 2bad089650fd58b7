"""The synthetic story world: determinism, ground truth that matches the pixels and the captions, continuity
rules, and a detector / caption checker that catch corrupted frames."""
import copy
import json

import numpy as np
import pytest
from PIL import Image

from seedstory.data import synthetic as S
from seedstory.data import world as W

STORIES = [S.generate_story(7, i, 30) for i in range(6)]


def test_world_has_a_varied_cast_and_settings():
    signatures = {(c["shape"], c["colour"], c["accessory"]) for c in W.CAST}
    assert len(W.CAST) >= 4 and len(signatures) == len(W.CAST)
    # every single trait is unique too, so any one of them tells characters apart
    for trait in ("shape", "colour", "accessory"):
        assert len({c[trait] for c in W.CAST}) == len(W.CAST)
    # enough to tell stories: arrivals and departures need more characters than positions
    assert len(W.CAST) > len(W.POSITIONS)
    assert len(W.SETTINGS) >= 4 and len(W.PROPS) >= 3 and len(W.ACTIONS) >= 3


def test_generation_is_deterministic_per_seed_and_index():
    again = S.generate_story(7, 3, 30)
    assert again == STORIES[3]
    assert S.generate_story(8, 3, 30) != STORIES[3]
    assert S.generate_story(7, 4, 30) != STORIES[3]
    a = np.asarray(S.render_frame(STORIES[0]["truth"][5], 96))
    b = np.asarray(S.render_frame(STORIES[0]["truth"][5], 96))
    assert a.shape == (96, 96, 3) and np.array_equal(a, b)


def test_dataset_is_independent_of_workers(tmp_path):
    one = S.write_dataset(str(tmp_path / "a"), 6, frames=4, size=64, seed=3, workers=1, progress=False)
    two = S.write_dataset(str(tmp_path / "b"), 6, frames=4, size=64, seed=3, workers=2, progress=False)
    assert one["train"] + one["val"] == 6 and one["val"] >= 1 and (one["train"], one["val"]) == (two["train"], two["val"])
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_text() == (tmp_path / "b" / split).read_text()
    rec = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert len(rec["images"]) == len(rec["captions"]) == len(rec["truth"]) == 4
    for rel in rec["images"]:
        assert (tmp_path / "a" / "images" / rel).read_bytes() == (tmp_path / "b" / "images" / rel).read_bytes()
    world = json.loads((tmp_path / "a" / "world.json").read_text())
    assert {c["name"] for c in world["cast"]} == set(W.CHARACTERS)
    # val and train never share a story
    val_ids = {json.loads(l)["id"] for l in (tmp_path / "a" / "val.jsonl").read_text().splitlines()}
    train_ids = {json.loads(l)["id"] for l in (tmp_path / "a" / "train.jsonl").read_text().splitlines()}
    assert val_ids and not val_ids & train_ids


def test_captions_parse_and_agree_with_truth():
    for story in STORIES:
        for caption, truth in zip(story["captions"], story["truth"]):
            assert S.parse_caption(caption) is not None, caption
            assert S.caption_agrees(caption, S.truth_scene(truth)) == [], caption


@pytest.mark.parametrize("size", [128, 256])
def test_detector_reads_the_ground_truth_from_pixels(size):
    checked = 0
    for story in STORIES[:3]:
        for truth in story["truth"][::3]:
            detected = S.detect(S.render_frame(truth, size))
            assert S.scene_diff(S.truth_scene(truth), detected) == [], truth
            checked += 1
    assert checked >= 30


def test_continuity_rules():
    for story in STORIES:
        prev = None
        for truth, caption in zip(story["truth"], story["captions"]):
            positions = [c["position"] for c in truth["characters"]]
            assert len(positions) == len(set(positions)) <= 3  # one character per place
            held = [c["holding"] for c in truth["characters"] if c["holding"]]
            on_ground = [p["name"] for p in truth["props"]]
            assert len(held + on_ground) == len(set(held + on_ground))  # a prop is in one place
            if prev is not None and truth["setting"] != prev["setting"]:
                # the place changes only on a travel event, and the caption names the new place
                assert any(e["type"].startswith("travel") for e in truth["event"]), caption
                assert S.parse_caption(caption)["setting"] == truth["setting"]
            prev = truth


def _recolour(image: Image.Image, src, dst) -> Image.Image:
    a = np.asarray(image).copy()
    a[(a == np.array(src, dtype=np.uint8)).all(-1)] = dst
    return Image.fromarray(a)


def test_detector_catches_corrupted_frames():
    truth = next(t for s in STORIES for t in s["truth"] if len(t["characters"]) >= 2)
    image = S.render_frame(truth, 128)
    expected = S.truth_scene(truth)
    name = truth["characters"][0]["name"]
    body = W.COLOURS[W.BY_NAME[name]["colour"]]
    other = next(c for c in W.CAST if c["name"] not in {x["name"] for x in truth["characters"]})
    # a character painted in another's colour no longer matches its signature
    assert S.scene_diff(expected, S.detect(_recolour(image, body, W.COLOURS[other["colour"]]))) != []
    # a character erased (painted over with the sky) is missed
    erased = _recolour(image, body, W.COLOURS[W.SETTINGS[truth["setting"]]["sky"]])
    assert S.scene_diff(expected, S.detect(erased)) != []
    # a changed place is seen
    other_setting = next(s for s in W.SETTING_NAMES if s != truth["setting"])
    moved = dict(truth, setting=other_setting)
    assert S.detect(S.render_frame(moved, 128))["setting"] == other_setting
    # noise is not a scene
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    assert S.scene_diff(expected, S.detect(noise)) != []


def test_caption_checker_catches_wrong_text():
    story = STORIES[0]
    truth = S.truth_scene(story["truth"][0])
    present = [c["name"] for c in truth["characters"]]
    absent = next(n for n in W.CHARACTERS if n not in present)
    assert S.caption_agrees(f"{absent} waves.", truth) != []
    assert S.caption_agrees(f"{present[0]} leaves.", truth) != []
    assert S.parse_caption("The dragon eats the castle.") is None
    assert S.parse_caption("") is None
    assert S.parse_caption(f"{present[0]} gives the apple to {present[0]}.") is None
    assert S.caption_entities("Pim met Bodo on the beach with a kite.") == {
        "characters": ["Pim", "Bodo"], "settings": ["beach"], "setting": "beach", "props": ["kite"]}


def _world_after_opening(seed: int, index: int):
    world = S._Story(S.story_rng(seed, index))
    world.opening()
    return world


@pytest.mark.parametrize("seed", [0, 7])
def test_following_a_true_storys_captions_gives_its_true_frames(seed):
    for index in range(40):
        story, world = S.generate_story(seed, index, 30), _world_after_opening(seed, index)
        for caption, truth in zip(story["captions"][1:], story["truth"][1:]):
            world, events = S.follow_caption(world, caption, allow_travel=truth is not story["truth"][1])
            assert world.truth(events) == truth, caption


def test_following_refuses_what_the_world_could_not_have_told_and_leaves_the_story_as_it_was():
    world = _world_after_opening(7, 0)  # the meadow: Tansy on the left, Wex on the right with the bucket
    assert (world.setting, world.chars) == ("meadow", {"Tansy": {"position": "left", "holding": None},
                                                       "Wex": {"position": "right", "holding": "bucket"}})
    before = world.truth([])
    state = copy.deepcopy({k: v for k, v in vars(world).items() if k != "rng"})
    for caption in ("Tansy gives the bucket to Wex.",                   # Tansy does not hold it
                    "Wex gives the bucket to Tansy. Tansy waves at Pim.",  # Pim is not there
                    "Pim waves.",                                       # not there
                    "Wex arrives on the left.",                         # already there
                    "Pim arrives on the left.",                         # the spot is taken
                    "Tansy picks up the bucket.",                       # Wex holds it
                    "Tansy stands on the left.",                        # only openings say so
                    "Tansy and Wex go to the meadow.",                  # already there
                    "Tansy goes to the beach.",                         # Wex would stay behind
                    "Tansy is very happy.",                             # not the world's language
                    "Wex gives the bucket to Tansy. Wex jumps.",        # a frame's two events touch two characters
                    "Tansy jumps. Tansy sings.",
                    "Tansy jumps. Wex sings. Wex waves."):              # three events
        assert S.follow_caption(world, caption) is None, caption
    assert world.truth([]) == before and {k: v for k, v in vars(world).items() if k != "rng"} == state
    assert S.follow_caption(world, "Tansy and Wex go to the beach.", allow_travel=False) is None  # not on frame 1
    after, events = S.follow_caption(world, "Wex gives the bucket to Tansy.")
    assert after.chars["Tansy"]["holding"] == "bucket" and world.chars["Wex"]["holding"] == "bucket"
    assert events == [{"type": "give", "character": "Wex", "to": "Tansy", "prop": "bucket"}]
    after, events = S.follow_caption(world, "Tansy jumps. Wex sings.")
    assert [c["action"] for c in after.truth(events)["characters"]] == ["jumps", "sings"]


def test_travel_somewhere_new_takes_its_ground_from_the_caption():
    world = _world_after_opening(7, 0)
    after, events = S.follow_caption(world, "Tansy and Wex go to the beach. A book lies on the right.")
    assert after.setting == "beach" and after.here() == {"right": "book"} and "book" not in after.pool
    assert events == [{"type": "travel", "setting": "beach", "characters": ["Tansy", "Wex"]}]
    assert S.follow_caption(after, "Tansy and Wex go to the meadow.") is not None  # nothing lies there
    assert S.follow_caption(after, "Tansy and Wex go to the meadow. A kite lies on the left.") is None
    assert S.follow_caption(world, "Tansy and Wex go to the beach. There is a bucket on the left.") is None  # held
