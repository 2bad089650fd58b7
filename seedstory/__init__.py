"""seedstory: SEED-Story (multimodal long-story generation) as a library, an app and training scripts.

    from seedstory import SeedStoryPipeline, StoryEngine
    pipe = SeedStoryPipeline.from_preset("tiny")
    engine = StoryEngine(pipe)
    tree = engine.start("opening.png", "Once upon a time...")
    frame = engine.step(tree)
"""
__version__ = "0.1.0"

_LAZY = {
    "SeedStoryPipeline": "seedstory.pipeline",
    "StoryEngine": "seedstory.engine",
    "StoryTree": "seedstory.story",
    "Frame": "seedstory.story",
    "StoryError": "seedstory.story",
    "ModelHolder": "seedstory.holder",
    "GenerationSettings": "seedstory.config",
    "load_preset": "seedstory.config",
    "save_story": "seedstory.storage",
    "load_story": "seedstory.storage",
    "export_story": "seedstory.export",
}


def __getattr__(name):  # imported on first use: `python -m seedstory --help` stays fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seedstory' has no attribute {name!r}")


__all__ = sorted(_LAZY)
