"""The shipped demo model (``assets/demo-model``, preset ``demo``): small enough to ship, the default
whenever it is present, and it tells stories in the synthetic world's language from a bundled opening."""
import os

import pytest

from seedstory.config import REPO_ROOT, load_preset, resolve_path

DEMO = resolve_path(load_preset("demo").path)


def _size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def test_the_demo_model_is_shipped_small_and_the_default():
    from seedstory.cli import default_preset

    assert os.path.isfile(os.path.join(DEMO, "seedstory.json")), "the demo model is missing from assets/"
    assert _size(DEMO) <= 40 * 2**20
    assert default_preset() == "demo"


def test_the_demo_model_continues_a_world_story():
    from seedstory.data import synthetic as S
    from seedstory.engine import StoryEngine
    from seedstory.pipeline import SeedStoryPipeline

    pipe = SeedStoryPipeline.from_preset("demo")
    assert pipe.device.type == "cpu"
    engine = StoryEngine(pipe)
    opening = os.path.join(REPO_ROOT, "assets", "examples", "world_beach.png")
    tree = engine.start(opening, "It is a bright day on the beach. Bodo stands on the left with the apple. "
                                 "Tansy stands on the right with the bucket.")
    frames = [engine.step(tree) for _ in range(2)]
    for f in frames:
        assert f.image is not None and f.image.size == (128, 128)
        assert S.parse_caption(f.text) is not None, f"not the world's language: {f.text!r}"
    # regenerating the picture with its own seed repeats it exactly
    again = engine.regenerate(tree, frames[-1].id, part="image", seed=frames[-1].seed)
    assert again.image.tobytes() == frames[-1].image.tobytes()


def test_a_model_folder_keeps_its_own_settings_under_an_override():
    """``--preset <folder> --set generation.X=...`` changes X only: the folder's sampling, repetition controls and
    context source stay (they used to fall back to the defaults, so a benchmark of a model folder decoded greedily
    and looped)."""
    from seedstory.pipeline import SeedStoryPipeline

    folder = resolve_path("assets/demo-model")
    own = SeedStoryPipeline.from_pretrained(folder).settings
    changed = SeedStoryPipeline.from_preset(folder, ["generation.num_inference_steps=1"]).settings
    assert changed == own.replace(num_inference_steps=1)
    assert changed.do_sample and changed.no_repeat_captions == own.no_repeat_captions > 0
