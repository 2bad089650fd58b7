"""The released files as a whole: a tiny fake ``./pretrained`` (tests/fake_release.py) loads through
``SeedStoryPipeline.from_preset``, tells a story, converts with ``python -m seedstory convert`` and the converted
folder tells the same story with the fake release gone."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fake_release import make_fake_release, patch_release
from seedstory.checkpoints.files import CheckpointError
from seedstory.checkpoints.release import load_release_pipeline, release_paths, release_root
from seedstory.cli import main
from seedstory.config import REPO_ROOT, PresetError, load_preset
from seedstory.engine import StoryEngine
from seedstory.pipeline import SeedStoryPipeline

TEXT = "George was curious about the big yellow hat."


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_release(str(tmp_path_factory.mktemp("release") / "pretrained"))


@pytest.fixture(scope="module")
def opening():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))


def tell(pipe, image, frames=2):
    engine = StoryEngine(pipe)
    tree = engine.start(image, TEXT)
    out = [(tree.path()[0].token_ids, tree.path()[0].features, None)]
    for _ in range(frames):
        f = engine.step(tree)
        out.append((f.token_ids, f.features, np.asarray(f.image)))
    return out


def assert_same_story(a, b):
    assert len(a) == len(b)
    for (ids_a, feat_a, img_a), (ids_b, feat_b, img_b) in zip(a, b):
        assert ids_a == ids_b
        torch.testing.assert_close(feat_a, feat_b, atol=1e-5, rtol=1e-5)
        if img_a is not None:
            assert img_a.shape == img_b.shape and np.array_equal(img_a, img_b)


@pytest.fixture(scope="module")
def release_story(fake, opening):
    pipe = SeedStoryPipeline.from_preset(fake["preset_path"])
    return pipe, tell(pipe, opening)


def _forbid_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("nothing may load before the file check")

    for name in ("load_release_tokenizer", "load_release_visual_tokenizer", "load_release_agent",
                 "load_release_detokenizer", "read_state_dict"):
        patch_release(monkeypatch, name, boom)


def test_fake_release_loads_from_preset_and_tells_a_story(fake, release_story):
    pipe, story = release_story
    n = fake["num_img_tokens"]
    assert pipe.name == "fake-george" and len(pipe.tokenizer) == fake["vocab"]
    assert pipe.agent.llm.get_input_embeddings().weight.shape[0] == fake["vocab"]
    assert pipe.agent.num_img_tokens == n and pipe.detokenizer.vae.dtype == torch.float32
    assert pipe.settings.num_inference_steps == 2 and pipe.offload_device is None
    assert not any("lora" in k for k in pipe.agent.state_dict())
    boi = pipe.tokenizer.convert_tokens_to_ids("<img>")
    assert len(story) == 3
    for ids, feats, img in story[1:]:
        assert ids[-(n + 2)] == boi and feats.shape == (1, 4, 32) and img.shape == (32, 32, 3)
    assert not np.array_equal(story[1][2], story[2][2])


def test_release_root_is_relative_to_the_repo(fake):
    cfg = load_preset("seed-story-george")
    assert release_root(cfg) == os.path.join(REPO_ROOT, "pretrained")
    assert release_paths(cfg)["agent"] == os.path.join(REPO_ROOT, "pretrained", "seed_story", "george_sft",
                                                       "pytorch_model.bin")
    assert release_root(load_preset(fake["preset_path"])) == fake["root"]


def test_convert_then_load_without_the_release(fake, release_story, opening, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--release", fake["root"], "--out", str(out), "--preset", fake["preset_path"]]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.load(open(out / "seedstory.json"))["format"] == "seedstory"
    for comp in ("visual_tokenizer", "agent/llm", "agent/input_resampler", "agent/output_resampler",
                 "detokenizer/resampler", "detokenizer/unet", "detokenizer/vae"):
        files = os.listdir(out / comp)
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files), comp
    assert os.path.isfile(out / "detokenizer" / "scheduler" / "scheduler_config.json")
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith((".bin", ".pt"))]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp folder left behind

    moved = fake["root"] + ".moved"
    os.rename(fake["root"], moved)
    try:
        pipe = SeedStoryPipeline.from_pretrained(str(out))
        assert type(pipe.tokenizer).__name__ == type(release_story[0].tokenizer).__name__
        assert pipe.tokenizer.legacy == release_story[0].tokenizer.legacy
        assert_same_story(tell(pipe, opening), release_story[1])
    finally:
        os.rename(moved, fake["root"])


def test_convert_refuses_non_empty_out_without_force(fake, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--release", fake["root"], "--out", str(out), "--preset", fake["preset_path"]]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and (out / "keep.txt").read_text() == "mine"
    args = ["convert", "--release", fake["root"], "--out", str(out), "--preset", fake["preset_path"], "--force",
            "--dtype", "bf16"]
    assert main(args) == 0
    assert not (out / "keep.txt").exists() and (out / "seedstory.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "agent" / "llm" / "model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
    with safe_open(str(out / "detokenizer" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F32"
    pipe = SeedStoryPipeline.from_pretrained(str(out))
    assert pipe.agent.dtype == torch.bfloat16


def test_missing_files_are_listed_in_one_error(fake, tmp_path, monkeypatch):
    root = tmp_path / "partial"
    shutil.copytree(fake["root"], root)
    os.remove(root / "cvlm_llama2_tokenizer" / "tokenizer.model")
    os.remove(root / "seed_story" / "george_sft" / "pytorch_model.bin")
    shutil.rmtree(root / "stable-diffusion-xl-base-1.0" / "vae")
    os.remove(root / "visual_tokenizer" / "qwen_vit_G.pt")
    cfg = load_preset(fake["preset_path"], [f"release.root={root}"])
    _forbid_loading(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        SeedStoryPipeline.from_preset(cfg)
    msg = str(e.value)
    for path, source in ((root / "cvlm_llama2_tokenizer" / "tokenizer.model", "TencentARC/SEED-Story"),
                         (root / "seed_story" / "george_sft" / "pytorch_model.bin", "TencentARC/SEED-Story"),
                         (root / "stable-diffusion-xl-base-1.0" / "vae" / "config.json", "stabilityai/stable-diffusion"),
                         (root / "visual_tokenizer" / "qwen_vit_G.pt", "extract-vit")):
        assert str(path) in msg and source in msg
    assert "5 release file(s) missing" in msg and msg.count("\n  - ") == 5  # vae: config + weights
    assert "doctor" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_release_pipeline(load_preset(fake["preset_path"], [f"release.root={tmp_path / 'nowhere'}"]))


def test_extracted_safetensors_vit_is_accepted(fake, tmp_path, release_story, opening):
    from safetensors.torch import save_file

    root = tmp_path / "st"
    shutil.copytree(fake["root"], root)
    vit = root / "visual_tokenizer"
    sd = torch.load(vit / "qwen_vit_G.pt", weights_only=True)
    os.remove(vit / "qwen_vit_G.pt")
    save_file(sd, str(vit / "qwen_vit_G.safetensors"))
    pipe = SeedStoryPipeline.from_preset(fake["preset_path"], [f"release.root={root}"])
    torch.testing.assert_close(pipe.encode_image(opening), release_story[1][0][1])


def test_cpu_offload_from_the_preset(fake, release_story, opening, monkeypatch):
    pipe = SeedStoryPipeline.from_preset(fake["preset_path"], ["runtime.cpu_offload=true"])
    assert pipe.offload_device == torch.device("cpu")
    moved = []
    orig = SeedStoryPipeline._running

    def spy(self, module):
        moved.append(type(module).__name__)
        return orig(self, module)

    monkeypatch.setattr(SeedStoryPipeline, "_running", spy)
    assert_same_story(tell(pipe, opening), release_story[1])
    assert {"QwenVisionTransformer", "Detokenizer"} <= set(moved)
    assert pipe.visual_tokenizer.device.type == "cpu" and pipe.detokenizer.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_quantization_without_cuda_fails_before_loading(fake, monkeypatch):
    _forbid_loading(monkeypatch)
    for mode in ("8bit", "4bit"):
        with pytest.raises(PresetError, match="CUDA"):
            SeedStoryPipeline.from_preset(fake["preset_path"], [f"runtime.llm_quantization={mode}"])
    with pytest.raises(PresetError, match="none, 8bit or 4bit"):
        SeedStoryPipeline.from_preset(fake["preset_path"], ["runtime.llm_quantization=3bit"])


def test_quantization_targets_the_decoder_linears(release_story):
    from seedstory.checkpoints.quantization import decoder_linears, quantize_llm, quantized_bytes

    llm = release_story[0].agent.llm
    found = decoder_linears(llm)
    assert len(found) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head and embeddings stay
    assert {name for _, name, _ in found} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert quantized_bytes(1000, "4bit") < quantized_bytes(1000, "8bit") < 2000
    if not torch.cuda.is_available():
        with pytest.raises(PresetError, match="CUDA"):
            quantize_llm(llm, "8bit", "cpu")


def test_image_token_count_must_match_the_input_resampler(fake, monkeypatch):
    _forbid_loading(monkeypatch)
    with pytest.raises(PresetError, match="sqrt"):
        SeedStoryPipeline.from_preset(fake["preset_path"], ["num_img_tokens=9"])


def test_tokenizer_dispatch(fake, tmp_path, release_story):
    from seedstory.tokens import build_byte_tokenizer, load_tokenizer

    tok = release_story[0].tokenizer
    tok.save_pretrained(str(tmp_path / "slow"))
    again = load_tokenizer(str(tmp_path / "slow"), 4)
    assert type(again) is type(tok) and again.encode(TEXT + "<img></img>[INST]x") == tok.encode(
        TEXT + "<img></img>[INST]x")
    fast = build_byte_tokenizer(4)
    fast.save_pretrained(str(tmp_path / "fast"))
    assert load_tokenizer(str(tmp_path / "fast"), 4).encode("abc") == fast.encode("abc")
