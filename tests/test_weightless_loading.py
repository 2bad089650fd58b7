"""Loading components without their weights: what a training process other than the first loads under FSDP 2
with ``fsdp_cpu_ram_efficient_loading`` (the first one's weights then fill it in; tests/test_training.py trains
with it). The structure must be exactly the one a full load gives, and no weight is read."""
import glob
import os

import pytest
import torch

from seedstory.pipeline import COMPONENTS, SeedStoryPipeline


def same_structure(whole: torch.nn.Module, empty: torch.nn.Module) -> None:
    """``empty`` has ``whole``'s parameters as meta tensors (same names, shapes, dtypes) and its buffers, real."""
    ours, theirs = whole.state_dict(), empty.state_dict()
    assert ours.keys() == theirs.keys()
    assert [(k, v.shape, v.dtype) for k, v in ours.items()] == [(k, v.shape, v.dtype) for k, v in theirs.items()]
    assert all(p.is_meta for p in empty.parameters())
    buffers = dict(empty.named_buffers())
    for name, buffer in whole.named_buffers():  # (e.g. the LLM's rotary frequencies, which no file carries)
        assert not buffers[name].is_meta and torch.equal(buffers[name], buffer), name


@pytest.fixture(scope="module")
def saved(tiny_pipeline, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weightless") / "model")
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_model_loads_each_component_without_weights(saved, dtype):
    whole = SeedStoryPipeline.from_pretrained(saved, device="cpu", torch_dtype=dtype)
    for part in COMPONENTS:
        pipe = SeedStoryPipeline.from_pretrained(saved, device="cpu", torch_dtype=dtype, weightless=[part])
        same_structure(getattr(whole, part), getattr(pipe, part))
        for other in set(COMPONENTS) - {part}:  # the others load whole
            ours, theirs = getattr(whole, other).state_dict(), getattr(pipe, other).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), other


def test_without_a_dtype_a_weightless_load_keeps_the_saved_one(tmp_path):
    SeedStoryPipeline.from_preset("tiny", ["runtime.dtype=bf16"]).save_pretrained(str(tmp_path / "bf16"))
    whole = SeedStoryPipeline.from_pretrained(str(tmp_path / "bf16"), device="cpu")
    empty = SeedStoryPipeline.from_pretrained(str(tmp_path / "bf16"), device="cpu", weightless=COMPONENTS)
    assert whole.agent.llm.dtype == torch.bfloat16
    for part in COMPONENTS:
        same_structure(getattr(whole, part), getattr(empty, part))


def test_weightless_components_read_no_weights_file(saved, tmp_path):
    """With the agent's and de-tokenizer's weight files gone, they still load without weights (and only so)."""
    import shutil

    from seedstory.checkpoints.files import CheckpointError

    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    for part in ("agent", "detokenizer"):
        for f in glob.glob(str(copy / part / "**" / "*.safetensors"), recursive=True):
            os.remove(f)
    pipe = SeedStoryPipeline.from_pretrained(str(copy), device="cpu", weightless=["agent", "detokenizer"])
    assert not any(p.is_meta for p in pipe.visual_tokenizer.parameters())
    with pytest.raises((OSError, EnvironmentError, CheckpointError, ValueError)):
        SeedStoryPipeline.from_pretrained(str(copy), device="cpu", weightless=["agent"])


def test_the_release_files_load_without_weights(tmp_path):
    from fake_release import make_fake_release

    from seedstory.checkpoints.release import load_release_pipeline

    fake = make_fake_release(str(tmp_path / "pretrained"))
    cfg = {**fake["preset"], "runtime": {**fake["preset"]["runtime"], "dtype": "bf16"}}
    whole = load_release_pipeline(cfg)
    empty = load_release_pipeline(cfg, weightless=COMPONENTS)
    for part in COMPONENTS:
        same_structure(getattr(whole, part), getattr(empty, part))


def test_weightless_is_refused_where_it_cannot_hold(saved):
    with pytest.raises(ValueError, match="no component llm"):
        SeedStoryPipeline.from_pretrained(saved, device="cpu", weightless=["llm"])
    with pytest.raises(ValueError, match="CPU only"):
        SeedStoryPipeline.from_preset("tiny", ["runtime.cpu_offload=true"], weightless=["agent"])
