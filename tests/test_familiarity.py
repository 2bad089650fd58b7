"""A model says when a picture is unlike its training pictures: the statistics, their file, the shipped demo
model's, and the app's note and examples."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seedstory import app_logic as logic
from seedstory.config import REPO_ROOT
from seedstory.familiarity import FAMILIARITY_FILE, Familiarity
from seedstory.holder import ModelHolder

EXAMPLES = os.path.join(REPO_ROOT, "assets", "examples")


def test_pictures_off_the_training_subspace_are_unfamiliar(tmp_path):
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(8, 64, generator=g)
    known = lambda n: torch.randn(n, 8, generator=g) @ directions + 0.01 * torch.randn(n, 64, generator=g)  # noqa: E731
    fam = Familiarity.fit(known(400).view(400, 4, 16), known(100), rank=8)
    assert (fam.distance(known(50)) < 1).all()
    assert (fam.distance(torch.randn(50, 64, generator=g)) > 5).all()

    fam.save(str(tmp_path))
    again = Familiarity.load(str(tmp_path))
    x = torch.cat([known(20), torch.randn(5, 64, generator=g)])
    assert again.threshold == fam.threshold and torch.equal(again.distance(x), fam.distance(x))
    assert Familiarity.load(str(tmp_path / "nowhere")) is None
    (tmp_path / FAMILIARITY_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        Familiarity.load(str(tmp_path))


def test_a_saved_model_keeps_its_statistics_and_refuses_foreign_ones(tmp_path, tiny_pipeline):
    from seedstory.config import PresetError
    from seedstory.pipeline import SeedStoryPipeline

    assert tiny_pipeline.familiarity is None and tiny_pipeline.unfamiliarity(Image.new("RGB", (32, 32))) is None
    feats = torch.cat([tiny_pipeline.encode_image(Image.new("RGB", (32, 32), (i, 2 * i, 100))) for i in range(40)])
    tiny_pipeline.familiarity = Familiarity.fit(feats[:30], feats[30:], rank=4)
    try:
        tiny_pipeline.save_pretrained(str(tmp_path / "model"))
    finally:
        tiny_pipeline.familiarity = None
    loaded = SeedStoryPipeline.from_pretrained(str(tmp_path / "model"), device="cpu")
    assert loaded.unfamiliarity(Image.new("RGB", (32, 32), (10, 20, 100))) < 1

    Familiarity(torch.zeros(7), torch.zeros(7, 2), 1.0).save(str(tmp_path / "model"))
    with pytest.raises(PresetError, match="another visual tokenizer"):
        SeedStoryPipeline.from_pretrained(str(tmp_path / "model"), device="cpu")


@pytest.fixture(scope="module")
def demo_holder():
    holder = ModelHolder("demo")
    holder.pipeline()
    return holder


def test_the_demo_model_knows_its_world_and_says_when_a_picture_is_not_from_it(demo_holder):
    pipe = demo_holder.pipeline()
    for path, _ in logic.examples("demo"):
        assert pipe.unfamiliarity(Image.open(path)) < 0.5, path
        assert logic.picture_note(demo_holder, path) == ""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    assert pipe.unfamiliarity(noise) > 1.5
    note = logic.picture_note(demo_holder, os.path.join(EXAMPLES, "robot_night.png"))
    assert "unlike anything the demo model was trained on" in note and "--preset seed-story-george" in note
    assert logic.picture_note(demo_holder, os.path.join(EXAMPLES, "missing.png")) == ""  # Start story reports it
    # Start story reads the same note from the opening it has already encoded
    robot = pipe.encode_image(Image.open(os.path.join(EXAMPLES, "robot_night.png")))
    assert logic.familiarity_note(demo_holder, robot) == note
    assert logic.familiarity_note(demo_holder, pipe.encode_image(Image.open(logic.examples("demo")[0][0]))) == ""


def test_the_app_offers_the_demo_its_own_openings_and_other_models_general_ones():
    demo = logic.examples("demo")
    assert demo and all(os.path.basename(p).startswith("world_") and os.path.isfile(p) for p, _ in demo)
    general = logic.examples("tiny")
    assert {os.path.basename(p) for p, _ in general} == {"fox_meadow.png", "robot_night.png"}
    assert all(os.path.isfile(p) for p, _ in general)
    assert logic.examples("no-such-preset") == general
