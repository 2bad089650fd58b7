"""The three training stages on the tiny preset and a few synthetic stories: each loss falls, a run killed
and resumed continues the same loss curve, and the exported checkpoints load into the story engine."""
import csv
import glob
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from seedstory.data.synthetic import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "train")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_dataset(str(out), stories=12, frames=6, size=64, seed=1, workers=1, progress=False)
    return out


def data_overrides(world):
    return [f"data.train_jsonl={world / 'train.jsonl'}", f"data.image_root={world / 'images'}"]


def losses(run, column):
    with open(os.path.join(run, "losses.csv")) as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


def mean(xs):
    return sum(xs) / len(xs)


def run_stage(module, config, run_dir, world, *extra, resume=False):
    import importlib

    stage = importlib.import_module(f"training.{module}")
    argv = ["--config", os.path.join(CONFIGS, config)] + (["--resume"] if resume else [])
    argv += [f"output_dir={run_dir}", "log_with=[]", *data_overrides(world), *extra]
    return stage.main(argv)


@pytest.fixture(scope="module")
def stage2_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage2")
    final = run_stage("stage2_agent", "tiny-stage2.yaml", run, world, "train.max_steps=40", "train.checkpoint_every=20")
    return run, final


@pytest.fixture(scope="module")
def stage1_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage1")
    # with condition dropout (the share of samples trained on the zero-image negative, for guidance),
    # Min-SNR loss weights, two noise draws per encoded image and a weight average: the demo's recipe
    final = run_stage("stage1_detokenizer", "tiny-stage1.yaml", run, world, "train.max_steps=40",
                      "train.condition_dropout=0.2", "train.snr_gamma=5", "train.noise_draws=2",
                      "train.ema_decay=0.99")
    return run, final


def test_stage1_loss_falls_and_exports(stage1_run):
    tmp_path, final = stage1_run
    steps, loss = losses(tmp_path, "loss")
    assert steps == list(range(1, 41))
    assert mean(loss[-8:]) < 0.8 * mean(loss[:8]), loss
    assert os.path.isfile(os.path.join(final, "model_index.json")) or os.listdir(final)
    # the jointly trained visual tokenizer was exported with the de-tokenizer
    assert os.path.isdir(os.path.join(final, "visual_tokenizer")) and os.path.isdir(os.path.join(final, "detokenizer"))


def test_stage2_loss_falls(stage2_run):
    run, _ = stage2_run
    steps, lm = losses(run, "lm_loss")
    _, rec = losses(run, "rec_loss")
    assert steps == list(range(1, 41))
    assert mean(lm[-8:]) < 0.7 * mean(lm[:8]), lm
    assert mean(rec[-8:]) < mean(rec[:8]), rec


def test_stage2_resume_continues_the_same_curve(world, stage2_run, tmp_path):
    """Stop at step 20 (a checkpoint), resume to 40: steps 21..40 repeat the uninterrupted run's losses."""
    full, _ = stage2_run
    run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path, world, "train.max_steps=40", "train.checkpoint_every=20",
              "train.stop_after=20")
    steps, _ = losses(tmp_path, "total_loss")
    assert steps[-1] == 20
    run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path, world, "train.max_steps=40", "train.checkpoint_every=20",
              resume=True)
    steps, resumed = losses(tmp_path, "total_loss")
    _, reference = losses(full, "total_loss")
    assert steps == list(range(1, 41))
    assert resumed == pytest.approx(reference, rel=1e-3, abs=1e-4)


def test_drop_condition_swaps_whole_samples_for_the_negative():
    import torch

    from training.detok_training import drop_condition, sample_generators

    features, negative = torch.randn(64, 4, 8), torch.randn(1, 4, 8)
    gens = lambda: sample_generators({"sample_seed": torch.arange(32)})  # noqa: E731  (two repeats of 32)
    assert torch.equal(drop_condition(features, negative, 0.0, gens()), features)
    assert torch.equal(drop_condition(features, negative, 1.0, gens()), negative.expand(64, 4, 8))
    mixed = drop_condition(features, negative, 0.5, gens())
    assert torch.equal(drop_condition(features, negative, 0.5, gens()), mixed)  # the samples' own draws
    dropped = [bool(torch.equal(m, negative[0])) for m in mixed]
    kept = [bool(torch.equal(m, f)) for m, f in zip(mixed, features)]
    assert all(d != k for d, k in zip(dropped, kept)) and 10 < sum(dropped) < 54


def test_min_snr_weights_cap_the_clean_timesteps_only():
    import torch
    from diffusers import DDPMScheduler

    from training.detok_training import DenoisingObjective, min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    t = torch.tensor([0, 50, 150, 400, 999])
    assert min_snr_weights(scheduler, t, 0.0) is None
    w = min_snr_weights(scheduler, t, 5.0)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    assert torch.allclose(w[snr > 5], 5.0 / snr[snr > 5]) and torch.all(w[snr <= 5] == 1.0)
    assert w[0] < 0.01 and torch.all(w[1:] >= w[:-1])  # noisier timesteps never weigh less

    class Echo(torch.nn.Module):  # a de-tokenizer predicting zeros: per-sample loss = mean(noise ** 2)
        def forward(self, x, t, features, time_ids):
            return torch.zeros_like(x)

    noise = torch.stack([torch.full((2, 2, 2), 1.0), torch.full((2, 2, 2), 3.0)])  # per-sample MSE 1 and 9
    args = (torch.zeros_like(noise), torch.tensor([0, 999]), noise, None)
    assert DenoisingObjective(Echo()).denoising_loss(*args, features=torch.zeros(2, 1, 1)).item() == 5.0
    weighted = DenoisingObjective(Echo(), None, scheduler, 5.0).denoising_loss(*args, features=torch.zeros(2, 1, 1))
    w0 = min_snr_weights(scheduler, torch.tensor([0]), 5.0).item()
    assert weighted.item() == pytest.approx((1.0 * w0 + 9.0 * 1.0) / 2)
    with pytest.raises(ValueError, match="noise scheduler"):
        DenoisingObjective(Echo(), snr_gamma=5.0)


def test_the_objective_encodes_the_pictures_in_fp32_under_mixed_precision(tiny_pipeline):
    """The de-tokenizer stages' VAE encodes inside the objective's forward (so FSDP gathers its weights), which
    accelerate runs under autocast with mixed precision (one process or DDP): the VAE must stay fp32 there, the
    UNet need not. (FSDP 2 and DeepSpeed cast the module itself to their dtype.)"""
    from diffusers import DDPMScheduler

    from training.detok_training import DenoisingObjective

    detok = tiny_pipeline.detokenizer
    seen = {}

    def record(name):
        def hook(module, inputs, out):
            seen.setdefault(name, out.dtype)
        return hook

    detok.vae.encoder.register_forward_hook(record("vae"))
    detok.unet.conv_in.register_forward_hook(record("unet"))
    objective = DenoisingObjective(detok, None, DDPMScheduler.from_config(detok.scheduler.config))
    size = detok.default_size[0]
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    features = torch.zeros(1, tiny_pipeline.agent.num_img_tokens, tiny_pipeline.visual_tokenizer.config.output_dim)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(pixels, [torch.Generator().manual_seed(0)], time_ids, features=features)
    assert seen == {"vae": torch.float32, "unet": torch.bfloat16} and torch.isfinite(loss)


def test_stage1_weights_its_loss_by_snr_gamma(world, tmp_path):
    """The first step sees the same batch, noise and timesteps; only the weights differ. A tiny gamma
    weighs nearly every timestep below 1 (gamma 5 would leave a small batch's noisy timesteps at 1)."""
    first = []
    for gamma in ("0", "0.001"):
        run_stage("stage1_detokenizer", "tiny-stage1.yaml", tmp_path / gamma, world, "train.max_steps=1",
                  f"train.snr_gamma={gamma}")
        first.append(losses(tmp_path / gamma, "loss")[1][0])
    plain, weighted = first
    assert weighted < 0.5 * plain


def test_noise_draws_reuse_each_encoding_with_fresh_noise_and_timesteps(tiny_pipeline):
    import torch
    from diffusers import DDPMScheduler

    from training.detok_training import noisy_latents, repeat_draws, sample_generators

    vae = tiny_pipeline.detokenizer.vae
    sched = DDPMScheduler.from_config(tiny_pipeline.detokenizer.scheduler.config)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = lambda seeds: sample_generators({"sample_seed": torch.tensor(seeds)})  # noqa: E731
    noisy, t, noise = noisy_latents(vae, sched, images, gens([5, 6, 7]), draws=2)
    assert noisy.shape[0] == t.shape[0] == noise.shape[0] == 6
    # undo the noising: both draws of an image hold the same clean latent, under different noise
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    clean = (noisy - (1 - a).sqrt() * noise) / a.sqrt()
    assert torch.allclose(clean[:3], clean[3:], atol=1e-3)
    assert not torch.allclose(noise[:3], noise[3:])
    # the conditions are repeated in the same order
    cond = torch.arange(3)[:, None].float()
    assert repeat_draws(cond, 2).flatten().tolist() == [0, 1, 2, 0, 1, 2]
    assert repeat_draws(cond, 1) is cond
    # each image's draws are its own: the same seed gives the same noise, in any batch
    _, t_alone, noise_alone = noisy_latents(vae, sched, images[1:2], gens([6]), draws=2)
    assert torch.equal(noise_alone, noise[1::3]) and torch.equal(t_alone, t[1::3])


def test_stage1_exports_the_weight_average(world, tmp_path):
    """``train.ema_decay`` > 0: the exported de-tokenizer is the average, not the last step's weights
    (which the checkpoint holds); without it the two are the same."""
    import torch
    from safetensors.torch import load_file

    from seedstory.pipeline import SeedStoryPipeline

    for decay in ("0", "0.99"):
        run = tmp_path / decay
        final = run_stage("stage1_detokenizer", "tiny-stage1.yaml", run, world, "train.max_steps=3",
                          "train.checkpoint_every=3", f"train.ema_decay={decay}")
        raw = load_file(str(run / "checkpoints" / "checkpoint_3" / "model.safetensors"))["detokenizer.unet.conv_in.weight"]
        exported = SeedStoryPipeline.from_pretrained(final, device="cpu").detokenizer.unet.conv_in.weight
        assert torch.equal(exported, raw) == (decay == "0")


def test_stage3_adapts_on_the_stage2_model_and_the_engine_tells_a_story(world, stage2_run, tmp_path, opening_image):
    from seedstory.engine import StoryEngine
    from seedstory.pipeline import SeedStoryPipeline

    _, stage2_final = stage2_run
    final = run_stage("stage3_adapt", "tiny-stage3.yaml", tmp_path, world, "train.max_steps=30",
                      f"model.pretrained={stage2_final}", "train.condition_dropout=0.1", "train.snr_gamma=5",
                      "train.noise_draws=2", "train.ema_decay=0.99")
    steps, loss = losses(tmp_path, "loss")
    assert steps == list(range(1, 31))
    assert mean(loss[-8:]) < mean(loss[:8]), loss
    pipe = SeedStoryPipeline.from_pretrained(final, device="cpu")
    engine = StoryEngine(pipe, mode="window", window=4)
    tree = engine.start(opening_image, "Pim is on the left.")
    frame = engine.step(tree)
    assert frame.image is not None and frame.image.size[0] > 0 and isinstance(frame.text, str)


def test_stage3_joins_stage2_agent_with_stage1_detokenizer(world, stage1_run, stage2_run, tmp_path):
    """As the demo build does (stage 2 does not wait for stage 1): ``model.detokenizer_from``."""
    import torch

    from seedstory.pipeline import SeedStoryPipeline

    (_, stage1_final), (_, stage2_final) = stage1_run, stage2_run
    final = run_stage("stage3_adapt", "tiny-stage3.yaml", tmp_path, world, "train.max_steps=3",
                      f"model.pretrained={stage2_final}", f"model.detokenizer_from={stage1_final}",
                      "train.unet_params=attn_kv")
    got = SeedStoryPipeline.from_pretrained(final, device="cpu")
    one = SeedStoryPipeline.from_pretrained(stage1_final, device="cpu")
    two = SeedStoryPipeline.from_pretrained(stage2_final, device="cpu")
    # only attention k/v were trained here: the rest of the UNet is stage 1's, the agent stage 2's
    assert torch.equal(got.detokenizer.unet.conv_in.weight, one.detokenizer.unet.conv_in.weight)
    assert not torch.equal(got.detokenizer.unet.conv_in.weight, two.detokenizer.unet.conv_in.weight)
    assert all(torch.equal(a, b) for a, b in zip(got.agent.state_dict().values(), two.agent.state_dict().values()))


def test_a_stage_takes_the_agent_from_another_folder(stage1_run, stage2_run, tmp_path):
    """As the demo build's stage 2 does (stage 0b's visual tokenizer, stage 2t's agent): ``model.agent_from``;
    an agent trained with another text tokenizer is refused by name."""
    import shutil

    from omegaconf import OmegaConf

    from seedstory.pipeline import SeedStoryPipeline
    from training.common import load_pipeline

    (_, stage1_final), (_, stage2_final) = stage1_run, stage2_run
    got = load_pipeline(OmegaConf.create({"model": {"pretrained": stage1_final, "agent_from": stage2_final}}))
    one = SeedStoryPipeline.from_pretrained(stage1_final, device="cpu")
    two = SeedStoryPipeline.from_pretrained(stage2_final, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(got.agent.state_dict().values(), two.agent.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(got.visual_tokenizer.state_dict().values(),
                                                 one.visual_tokenizer.state_dict().values()))
    other = tmp_path / "other"
    shutil.copytree(stage2_final, other)
    vocab = other / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"a":', '"\u00e4":', 1))
    with pytest.raises(ValueError, match="agent_from: .*another text tokenizer"):
        load_pipeline(OmegaConf.create({"model": {"pretrained": stage1_final, "agent_from": str(other)}}))


def test_stage2_takes_its_loss_weights_from_the_training_config(world, tmp_path):
    for scale in (0.0, 3.0):
        run = tmp_path / str(scale)
        run_stage("stage2_agent", "tiny-stage2.yaml", run, world, "train.max_steps=1", "train.lm_loss_scale=1",
                  f"train.rec_loss_scale={scale}")
        (_, total), (_, lm), (_, rec) = (losses(run, c) for c in ("total_loss", "lm_loss", "rec_loss"))
        assert rec[0] > 0
        assert total[0] == pytest.approx(lm[0] + scale * rec[0], rel=1e-4)


def test_stage2_text_only_trains_the_llm_on_the_stories_text_alone(world, tmp_path):
    import torch
    from seedstory.pipeline import SeedStoryPipeline

    before = SeedStoryPipeline.from_preset("tiny")
    final = run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path, world, "train.max_steps=30",
                      "data.text_only=true", "data.label_context=true", f"data.image_root={tmp_path / 'no-images'}")
    steps, lm = losses(tmp_path, "lm_loss")
    assert steps[-1] == 30 and mean(lm[-5:]) < 0.8 * mean(lm[:5])
    with open(os.path.join(tmp_path, "losses.csv")) as f:
        assert "rec_loss" not in f.readline()  # no picture comes out either
    after = SeedStoryPipeline.from_pretrained(final, device="cpu")
    for name in ("input_resampler", "output_resampler"):  # no picture goes in: the resamplers are as they were
        old, new = getattr(before.agent, name).state_dict(), getattr(after.agent, name).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert not torch.equal(before.agent.llm.lm_head.weight, after.agent.llm.lm_head.weight)


def test_stage2_possible_loss_trains_beside_the_lm_loss(world, tmp_path):
    run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path, world, "train.max_steps=20", "data.text_only=true",
              "data.label_context=true", f"data.image_root={tmp_path / 'no-images'}", "train.possible_loss_scale=2")
    (steps, total), (_, lm), (_, possible) = (losses(tmp_path, c) for c in ("total_loss", "lm_loss", "possible_loss"))
    assert steps[-1] == 20 and all(p > 0 for p in possible)
    assert total[0] == pytest.approx(lm[0] + 2 * possible[0], rel=1e-4)
    assert mean(possible[-5:]) < 0.8 * mean(possible[:5])


def test_sigkill_then_resume(world, tmp_path):
    """A real ``kill -9`` while training: --resume picks up the last complete checkpoint and finishes."""
    cmd = [sys.executable, "-m", "training.stage2_agent", "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"),
           f"output_dir={tmp_path}", "log_with=[]", *data_overrides(world), "train.max_steps=400",
           "train.checkpoint_every=5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "checkpoints" / "checkpoint_5" / "trainer_state.json"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the deadline"
    killed_at, _ = losses(tmp_path, "total_loss")
    run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path, world, f"train.max_steps={max(killed_at[-1], 5) + 3}",
              "train.checkpoint_every=5", resume=True)
    steps, _ = losses(tmp_path, "total_loss")
    # the rows a killed run logged after its last checkpoint are replaced, never duplicated
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == max(killed_at[-1], 5) + 3


def test_stage0_vae_loss_falls(world, tmp_path):
    import torch

    from seedstory.pipeline import SeedStoryPipeline

    final = run_stage("stage0_vae", "tiny-stage0.yaml", tmp_path, world, "train.max_steps=100",
                      "train.mse_weight=2", "train.kl_weight=0.01", "train.detail_weight=10")
    steps, l1 = losses(tmp_path, "l1")
    assert steps == list(range(1, 101))
    assert mean(l1[-6:]) < 0.8 * mean(l1[:6]), l1
    # each term reaches the loss with its weight
    _, mse = losses(tmp_path, "mse")
    _, kl = losses(tmp_path, "kl")
    _, total = losses(tmp_path, "loss")
    assert all(t == pytest.approx(a + 2 * b + 0.01 * c, rel=1e-4)
               for t, a, b, c in zip(total, l1, mse, kl)), (total, l1, mse, kl)
    before = SeedStoryPipeline.from_preset("tiny").detokenizer.vae
    after = SeedStoryPipeline.from_pretrained(final, device="cpu").detokenizer.vae
    changed = [n for (n, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items())
               if not torch.equal(a, b)]
    assert changed  # the trained VAE was exported with the rest of the pipeline


class _IdentityVAE:
    """encode/decode stand-in: the latent is the image, the decoder adds a fixed error."""

    def __init__(self, error):
        self.error = error

    def encode(self, x):
        import torch
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: x, kl=lambda: torch.zeros(x.shape[0])))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z + self.error)


def test_detail_weights_make_errors_on_small_things_count_more():
    import torch

    from training.stage0_vae import AutoencoderObjective, detail_weights

    image = torch.full((1, 3, 64, 64), 0.6)  # a flat background...
    image[:, :, 30:34, 30:34] = -0.7  # ...with one small dark thing on it
    w = detail_weights(image, 10)
    assert w.shape == (1, 1, 64, 64) and float(w.mean()) == pytest.approx(1.0)
    assert float(w[0, 0, 31, 31]) > 3 * float(w[0, 0, 5, 5])
    assert torch.allclose(detail_weights(image, 0), torch.ones_like(w))
    # the same error (16 pixels off by 0.5) on the small thing or on the flat background
    on_thing, on_flat = torch.zeros_like(image), torch.zeros_like(image)
    on_thing[:, :, 30:34, 30:34] = 0.5
    on_flat[:, :, 5:9, 5:9] = 0.5
    for term in ("l1", "mse"):
        plain = [float(AutoencoderObjective(_IdentityVAE(e), 0.0, 1.0)(image)[term]) for e in (on_thing, on_flat)]
        weighted = [float(AutoencoderObjective(_IdentityVAE(e), 0.0, 1.0, 10.0)(image)[term]) for e in (on_thing, on_flat)]
        assert plain[0] == pytest.approx(plain[1])
        assert weighted[0] > 3 * weighted[1], (term, weighted)


def test_text_tokenizer_on_world_captions(world, tmp_path):
    from seedstory.prompt import PromptFormat
    from seedstory.tokens import ImageTokenIds, load_tokenizer
    from training.text_tokenizer import main as train_tokenizer

    out = train_tokenizer(["--jsonl", str(world / "train.jsonl"), "--vocab-size", "400", "--num-img-tokens", "16",
                           "--out", str(tmp_path / "tok")])
    tok = load_tokenizer(out, 16)
    ids = ImageTokenIds.from_tokenizer(tok, 16)
    caption = "Pim gives the kite to Bodo."
    encoded = tok(caption, add_special_tokens=False)["input_ids"]
    assert tok.decode(encoded) == caption and len(encoded) < len(caption) // 2  # BPE merged the world's words
    assert not set(encoded) & set(ids.block)  # plain text never yields image tokens
    prompt = PromptFormat(tok, 16)
    sample = prompt.training_sample(["Pim is on the left.", "Pim waves."], 0)
    assert int(sample.ids_gen_mask.sum()) == 16 and int(sample.embeds_cmp_mask.sum()) == 1


def test_stage0_vit_learns_image_dependent_features(world, tmp_path):
    """Stage 0b: the read-out loss falls and the exported visual tokenizer gives different features for
    different frames (the collapse it exists to prevent would make them all alike)."""
    import json

    import torch
    from PIL import Image

    from seedstory.pipeline import SeedStoryPipeline

    final = run_stage("stage0_vit", "tiny-stage0v.yaml", tmp_path, world, "train.max_steps=40")
    steps, loss = losses(tmp_path, "loss")
    assert steps == list(range(1, 41))
    assert mean(loss[-6:]) < 0.8 * mean(loss[:6]), loss
    pipe = SeedStoryPipeline.from_pretrained(final, device="cpu")
    with open(world / "train.jsonl") as f:  # the openings of four stories: four different scenes
        openings = [json.loads(line)["images"][0] for line in f.readlines()[:4]]
    frames = [Image.open(world / "images" / p).convert("RGB") for p in openings]
    features = torch.cat([pipe.encode_image(im) for im in frames])
    assert features.std(dim=0).mean() > 0.05 * features.std()


ENGINE_CONFIGS = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
ENGINE_NAMES = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def two_processes(engine: str, port: str) -> list[str]:
    """The command that launches two CPU processes under ``engine``: plain DDP (torchrun), or FSDP 2 or
    DeepSpeed ZeRO-2/3 (accelerate launch with our config, fp32 so the curve can equal one process's)."""
    if engine in ENGINE_CONFIGS:
        if engine.startswith("zero"):
            pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e .[train])")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(ROOT, "configs", "accelerate", ENGINE_CONFIGS[engine]), "--num_processes", "2",
                "--mixed_precision", "no", "--main_process_port", port]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


@pytest.mark.parametrize("engine, ports", [("ddp", ("29550", "29551", "29552")), ("fsdp", ("29553", "29554", "29555")),
                                           ("zero2", ("29546", "29547", "29548")),
                                           ("zero3", ("29556", "29557", "29558"))])
def test_kill_9_under_two_processes_then_resume_gives_the_same_curve(world, tmp_path, engine, ports):
    """``kill -9`` of a 2-process DDP, FSDP or DeepSpeed ZeRO-2 / ZeRO-3 run (launcher and both ranks) once a checkpoint
    is written, then ``--resume`` (FSDP, ZeRO: from each process's shards): the loss curve of the run that was
    never interrupted."""
    import signal
    import time

    def command(run, port, resume=False):
        return [*two_processes(engine, port), "-m", "training.stage2_agent",
                "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"),
                *(["--resume"] if resume else []), f"output_dir={run}", "log_with=[]", "train.max_steps=30",
                "train.checkpoint_every=2", "train.keep_checkpoints=50", *data_overrides(world)]

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    whole = subprocess.run(command(tmp_path / "whole", ports[0]), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(command(run, ports[1]), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run / "checkpoints" / "checkpoint_4" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    steps_before, _ = losses(run, "total_loss")
    assert 4 <= steps_before[-1] < 30, steps_before  # killed between a checkpoint and the end
    resumed = subprocess.run(command(run, ports[2], resume=True), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps, curve = losses(run, "total_loss")
    assert steps == list(range(1, 31))
    assert curve == pytest.approx(losses(tmp_path / "whole", "total_loss")[1], rel=1e-5)


STAGE_RUNS = [
    ("stage0_vae", "tiny-stage0.yaml", []),  # random crops, the posterior's samples
    ("stage0_vit", "tiny-stage0v.yaml", []),
    # condition dropout, two noise draws and Min-SNR weights, as the demo trains
    ("stage1_detokenizer", "tiny-stage1.yaml",
     ["train.condition_dropout=0.3", "train.noise_draws=2", "train.snr_gamma=5"]),
    ("stage2_agent", "tiny-stage2.yaml", []),
    ("stage3_adapt", "tiny-stage3.yaml", ["train.condition_dropout=0.3", "train.noise_draws=2"]),
]


@pytest.fixture(scope="module")
def tiny_start(tmp_path_factory):
    """The tiny preset saved: where the stages start from in the engines' tests, so that the processes other than
    the first load from files what they leave to process 0 (a random preset is drawn whole by each)."""
    from seedstory.pipeline import SeedStoryPipeline

    path = tmp_path_factory.mktemp("tiny_start") / "model"
    SeedStoryPipeline.from_preset("tiny").save_pretrained(str(path))
    return path


# Per stage, what its processes other than the first load without weights: what it trains (under FSDP 2 with
# fsdp_cpu_ram_efficient_loading, as fsdp.yaml, and under ZeRO-3) and what it does not use (under any engine).
STAGE_PARTS = {"stage0_vae": (["detokenizer"], ["visual_tokenizer", "agent"]),
               "stage0_vit": (["visual_tokenizer"], ["agent", "detokenizer"]),
               "stage1_detokenizer": (["visual_tokenizer", "detokenizer"], ["agent"]),  # (train_visual_tokenizer)
               "stage2_agent": (["agent"], ["detokenizer"]),
               "stage3_adapt": (["detokenizer"], [])}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The folder of each stage's one-process run with the global batch (4), made once and shared by the engines'
    tests."""
    return tmp_path_factory.mktemp("one_process")


# (stage 2 under DDP: test_two_cpu_processes_train_one_model_together, with resume and two "nodes")
@pytest.mark.parametrize("module, config, extra, engine, port", [
    (*run, engine, str(29560 + 10 * e + i)) for e, engine in enumerate(("ddp", "fsdp", "zero2", "zero3"))
    for i, run in enumerate(STAGE_RUNS) if (run[0], engine) != ("stage2_agent", "ddp")])
def test_two_cpu_processes_train_each_stage_as_one(world, stage2_run, tiny_start, one_process_runs, tmp_path,
                                                  opening_image, module, config, port, extra, engine):
    """Each stage under two CPU processes (gloo), batch 2 each, plain DDP (``torchrun --nproc_per_node 2``), FSDP 2
    or DeepSpeed ZeRO-2 / ZeRO-3 (``accelerate launch --config_file configs/accelerate/<engine>.yaml``), against
    one process with batch 4: the same samples step by step (the datasets shard one stream) with the same random
    draws (each sample's crop, noise, timestep and dropout come from its own place in the stream), so the same loss
    curve; one export (under FSDP and ZeRO-3 gathered from both processes' shards) with the weights one process
    trains, which loads and generates. The processes other than the first load without weights what they leave to
    the first one or do not use (STAGE_PARTS): were one of them needed, the run would fail or train another model."""
    from seedstory.engine import StoryEngine
    from seedstory.pipeline import COMPONENTS, SeedStoryPipeline

    base = [f"model.pretrained={stage2_run[1] if module == 'stage3_adapt' else tiny_start}"]

    def launch(run, launcher, *overrides):
        cmd = [*launcher, "-m", f"training.{module}", "--config", os.path.join(CONFIGS, config),
               f"output_dir={run}", "log_with=[]", "train.max_steps=3", "train.checkpoint_every=3",
               *data_overrides(world), *base, *extra, *overrides]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    two = launch(tmp_path / "two", two_processes(engine, port), "train.batch_size=2")
    # (the two processes' lines may reach the shared output interleaved)
    kind = ENGINE_NAMES[engine]
    assert sorted(re.findall(r"training: (\w+), process (\d+) of (\d+)", two)) == [(kind, "0", "2"), (kind, "1", "2")]
    trained, unused = STAGE_PARTS[module]
    why = {**({p: "its shards come from process 0" for p in trained} if engine in ("fsdp", "zero3") else {}),
           **{p: "not used here" for p in unused}}
    said = re.findall(r"process (\d+) loads without weights: (.*)", two)
    assert said == ([("1", ", ".join(f"{p} ({why[p]})" for p in COMPONENTS if p in why))] if why else [])
    one = one_process_runs / module
    if not (one / "final").is_dir():
        launch(one, [sys.executable], "train.batch_size=4")
    column = "total_loss" if module == "stage2_agent" else "loss"
    steps, curve_two = losses(tmp_path / "two", column)
    assert steps == [1, 2, 3]
    assert curve_two == pytest.approx(losses(one, column)[1], rel=1e-4)
    assert two.count("exported") == 1
    exported = [SeedStoryPipeline.from_pretrained(str(run / "final")) for run in (tmp_path / "two", one)]
    for part in ("visual_tokenizer", "agent", "detokenizer"):
        ours, theirs = (getattr(p, part).state_dict() for p in exported)
        assert ours.keys() == theirs.keys()
        # Adam moves a weight whose gradient is float noise by a fraction of a learning-rate step (2e-3 here): a
        # few such weights differ; a model trained otherwise differs almost everywhere.
        off = sum(int((~torch.isclose(ours[k], theirs[k], rtol=1e-3, atol=1e-4)).sum()) for k in ours)
        assert off <= 1e-3 * sum(v.numel() for v in ours.values()), (part, off)
        assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours if ours[k].numel()) < 2e-3, part
    engine = StoryEngine(exported[0], mode="window", window=4)
    frame = engine.step(engine.start(opening_image, "Pim is on the left."))
    assert frame.image is not None and isinstance(frame.text, str)


def test_under_fsdp_only_process_0_reads_the_weights_it_shards(world, stage2_run, tmp_path):
    """Stage 2 as the release trains it (LoRA on an LLM loaded in bf16, bf16 mixed precision), from a saved model,
    under 2-process FSDP 2: with ``fsdp_cpu_ram_efficient_loading`` (fsdp.yaml) process 1 loads the agent without
    weights and receives its shards from process 0, and trains exactly what it trains when it loads the weights
    itself. Either way it does not load the de-tokenizer's weights, which stage 2 does not use.
    (bench/bench_loading.py measures the memory this saves.)"""
    from safetensors.torch import load_file

    def launch(run, efficient, port):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"), "--num_processes", "2", "--mixed_precision",
               "bf16", "--main_process_port", port, "--fsdp_cpu_ram_efficient_loading", efficient,
               "-m", "training.stage2_agent",
               "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"), f"output_dir={run}", "log_with=[]",
               "train.max_steps=3", "train.checkpoint_every=3", f"model.pretrained={stage2_run[1]}", "model.dtype=bf16",
               "train.mixed_precision=bf16", "train.lora={r: 4, alpha: 8}", *data_overrides(world)]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    filled = launch(tmp_path / "filled", "true", "29641")
    assert ("process 1 loads without weights: agent (its shards come from process 0), detokenizer (not used here)"
            in filled)
    whole = launch(tmp_path / "whole", "false", "29642")
    assert "process 1 loads without weights: detokenizer (not used here)" in whole
    assert losses(tmp_path / "filled", "total_loss") == losses(tmp_path / "whole", "total_loss")
    for f in glob.glob(str(tmp_path / "filled" / "final" / "agent" / "**" / "*.safetensors"), recursive=True):
        ours, theirs = load_file(f), load_file(f.replace(os.sep + "filled" + os.sep, os.sep + "whole" + os.sep))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f


def test_two_cpu_processes_train_one_model_together(world, tmp_path):
    """``torchrun --nproc_per_node 2`` on CPUs (gloo): the two processes join as ranks 0 and 1 of 2 (without a GPU,
    accelerate used to leave each alone as "rank 0 of 1", training its own copy and racing on the export), log
    each step once, and train the model one process trains with the same global batch: the same samples, the same
    loss curve and learning rates, and weights equal within float tolerance; one export, which loads. Stopped
    after a checkpoint and resumed under two processes, the run goes on along the same curve; two "nodes" (two
    launches on this machine) train the same model too."""
    from seedstory.pipeline import SeedStoryPipeline

    def launch(run, launcher, *overrides, resume=False):
        cmd = [*launcher, "-m", "training.stage2_agent", "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"),
               *(["--resume"] if resume else []), f"output_dir={run}", "log_with=[]", "train.max_steps=4",
               "train.checkpoint_every=2", *data_overrides(world), *overrides]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    two = launch(tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29533"])
    # (the two processes' lines may reach the shared output interleaved)
    ranks = sorted(re.findall(r"training: (\w+), process (\d+) of (\d+)", two))
    assert ranks == [("MULTI_CPU", "0", "2"), ("MULTI_CPU", "1", "2")]
    launch(tmp_path / "one", [sys.executable], "train.batch_size=4")  # the global batch of 2 x 2
    steps, lr_two = losses(tmp_path / "two", "lr")
    assert steps == [1, 2, 3, 4] and lr_two == losses(tmp_path / "one", "lr")[1]
    for column in ("total_loss", "lm_loss", "rec_loss"):
        curve_two, curve_one = losses(tmp_path / "two", column)[1], losses(tmp_path / "one", column)[1]
        assert curve_two == pytest.approx(curve_one, rel=1e-4), column
    assert two.count("exported") == 1
    # Stopped after step 2 and resumed under the same two processes: the same curve to the end.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
    launch(tmp_path / "split", torchrun, "train.stop_after=2")
    assert losses(tmp_path / "split", "lm_loss")[0] == [1, 2]
    launch(tmp_path / "split", torchrun, resume=True)
    steps_split, curve_split = losses(tmp_path / "split", "total_loss")
    assert steps_split == [1, 2, 3, 4]
    assert curve_split == pytest.approx(losses(tmp_path / "two", "total_loss")[1], rel=1e-5)
    # Two "nodes" on this machine (two launches, node ranks 0 and 1, the main one at 127.0.0.1): the same curve.
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", "29535",
                               "-m", "training.stage2_agent", "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"),
                               f"output_dir={tmp_path / 'nodes'}", "log_with=[]", "train.max_steps=4",
                               *data_overrides(world)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT,
                                                                           OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sorted(re.findall(r"process (\d+) of (\d+)", outs[0][0] + outs[1][0])) == [("0", "2"), ("1", "2")]
    assert losses(tmp_path / "nodes", "total_loss")[1] == pytest.approx(losses(tmp_path / "one", "total_loss")[1],
                                                                         rel=1e-4)
    # Adam divides by the gradients' own scale, so float noise in a near-zero gradient moves a weight by up to
    # about 1e-5 here: far below one step of the learning rate (2e-3).
    trained = [SeedStoryPipeline.from_pretrained(str(tmp_path / run / "final")).agent.state_dict()
               for run in ("two", "one")]
    for key, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][key], rtol=1e-3, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_two_nodes_with_the_multi_node_config_train_one_model(world, tmp_path):
    """The README's two-node launch (configs/accelerate/multi_node.yaml: DeepSpeed ZeRO-2, each node starting its
    own processes), as two "nodes" on this machine (``--machine_rank 0|1 --main_process_ip 127.0.0.1``, one
    process each): ranks 0 and 1 of 2, and the curve of one process with the global batch."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e .[train])")
    stage = ["-m", "training.stage2_agent", "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"), "log_with=[]",
             "train.max_steps=3", "train.batch_size=2", *data_overrides(world)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               os.path.join(ROOT, "configs", "accelerate", "multi_node.yaml"), "--machine_rank", str(r),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", "29537", "--num_machines", "2",
                               "--num_processes", "2", "--mixed_precision", "no", *stage,
                               f"output_dir={tmp_path / 'nodes'}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # (accelerate writes
    # .deepspeed_env, a copy of the environment, where it runs)
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    ranks = sorted(re.findall(r"training: (\w+), process (\d+) of (\d+)", outs[0][0] + outs[1][0]))
    assert ranks == [("DEEPSPEED", "0", "2"), ("DEEPSPEED", "1", "2")]
    one = subprocess.run([sys.executable, *stage, "train.batch_size=4", f"output_dir={tmp_path / 'one'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    steps, curve = losses(tmp_path / "nodes", "total_loss")
    assert steps == [1, 2, 3] and curve == pytest.approx(losses(tmp_path / "one", "total_loss")[1], rel=1e-4)


def test_a_weight_average_is_refused_where_the_weights_are_sharded():
    """``train.ema_decay`` under FSDP or ZeRO-3 would average and checkpoint each process's shard: refused with a
    message; ZeRO-2 and DDP keep whole weights and may average them."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from training.common import make_weight_average

    def accelerator(kind, zero_stage=None):
        plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
        return SimpleNamespace(distributed_type=SimpleNamespace(value=kind),
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    t = OmegaConf.create({"ema_decay": 0.99})
    for kind, stage in (("FSDP", None), ("DEEPSPEED", 3)):
        with pytest.raises(ValueError, match="ema_decay is not supported under FSDP or DeepSpeed ZeRO-3"):
            make_weight_average(accelerator(kind, stage), torch.nn.Linear(2, 2), t)
    assert make_weight_average(accelerator("FSDP"), torch.nn.Linear(2, 2), OmegaConf.create({"ema_decay": 0})) is None


def test_an_engine_accelerate_cannot_give_is_refused_by_name():
    """A launch config asking for FSDP or DeepSpeed on CPUs (accelerate quietly falls back to plain DDP there)
    stops with a message naming the engine asked for, what was set up, and what to launch instead."""
    from training.common import engine_mismatch

    why = engine_mismatch({"ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU")
    assert "asks for FSDP" in why and "MULTI_CPU" in why and "torchrun" in why
    assert "asks for DeepSpeed" in engine_mismatch({"ACCELERATE_USE_DEEPSPEED": "True"}, "NO")
    assert engine_mismatch({"ACCELERATE_USE_FSDP": "true"}, "FSDP") is None
    assert engine_mismatch({"ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED") is None
    assert engine_mismatch({}, "MULTI_CPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine accelerate runs FSDP 1 as asked")
def test_fsdp_1_launch_on_cpus_stops_with_that_message(world, tmp_path):
    """FSDP runs on CPU processes as FSDP 2 only (fsdp_on_cpus): an FSDP 1 config there stops, saying so."""
    import yaml

    with open(os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml")) as f:
        config = yaml.safe_load(f)
    config["fsdp_config"]["fsdp_version"] = 1
    (tmp_path / "fsdp1.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp1.yaml"),
                           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29536",
                           "-m", "training.stage2_agent", "--config", os.path.join(CONFIGS, "tiny-stage2.yaml"),
                           f"output_dir={tmp_path / 'run'}", "log_with=[]", "train.max_steps=2", *data_overrides(world)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "FSDP runs on CPUs as FSDP 2 only: set fsdp_version: 2" in done.stderr


def test_fsdp_wraps_the_blocks_of_what_each_stage_trains(tiny_pipeline):
    """Under FSDP each stage shards its own blocks: the agent its Llama decoder layers, the de-tokenizer its UNet's
    transformer and ResNet blocks, the VAE its ResNet blocks, the visual tokenizer its ViT blocks. (A launch config
    naming LlamaDecoderLayer, as ours did, stops every stage but stage 2: accelerate cannot find the class.)"""
    from types import SimpleNamespace

    import yaml
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from omegaconf import OmegaConf

    from training.common import prepare_training
    from training.stage0_vae import AutoencoderObjective
    from training.stage0_vit import ReadoutObjective

    with open(os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml")) as f:
        assert "fsdp_transformer_layer_cls_to_wrap" not in yaml.safe_load(f)["fsdp_config"]
    pipe = tiny_pipeline
    vit = pipe.visual_tokenizer
    stages = {
        "stage 0": (AutoencoderObjective(pipe.detokenizer.vae, 1e-6), {"ResnetBlock2D"}),
        "stage 0b": (ReadoutObjective(vit, vit.config.n_queries, vit.config.output_dim, 8), {"VisualAttentionBlock"}),
        "stages 1 and 3": (pipe.detokenizer, {"BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D",
                                              "UpBlock2D"}),
        "stage 2": (pipe.agent, {"LlamaDecoderLayer"}),
    }
    for stage, (model, blocks) in stages.items():
        plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), prepare=lambda *parts: parts,
                                      distributed_type=DistributedType.FSDP)
        shell = prepare_training(accelerator, model, OmegaConf.create({"lr": 1e-3, "max_steps": 2}))[-1]
        assert {p.device.type for p in shell.parameters()} == {"meta"}  # where the export's gathered weights go
        plugin.set_auto_wrap_policy(model)  # what accelerate.prepare does under FSDP; raises on an unknown class
        wrapped = {type(m).__name__ for m in model.modules()
                   if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)}
        assert wrapped == blocks, stage
        whole = [m for m in model.modules() if type(m).__name__ in blocks]
        assert whole and all(plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0) for m in whole)
    layers = [m for m in pipe.agent.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(layers) == pipe.agent.llm.config.num_hidden_layers


def test_a_stage_loads_the_model_in_bf16_and_trains_its_part_in_fp32(world, tmp_path):
    """``model.dtype: bf16`` (the release-size LoRA config's): every process holds the frozen parts in half the
    memory, the trained parameters stay fp32 for the optimizer, the run needs mixed precision and says so."""
    from omegaconf import OmegaConf

    from seedstory.pipeline import SeedStoryPipeline
    from training.common import load_pipeline

    def nbytes(pipe):
        return sum(t.numel() * t.element_size() for m in (pipe.visual_tokenizer, pipe.agent, pipe.detokenizer)
                   for t in m.parameters())

    half = load_pipeline(OmegaConf.create({"model": {"preset": "tiny", "dtype": "bf16"}}))
    full = load_pipeline(OmegaConf.create({"model": {"preset": "tiny"}}))
    assert {p.dtype for p in half.agent.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.visual_tokenizer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.detokenizer.vae.parameters()} == {torch.float32}  # the VAE stays fp32
    vae = sum(p.numel() * 4 for p in full.detokenizer.vae.parameters())
    assert nbytes(half) == (nbytes(full) + vae) // 2

    from types import SimpleNamespace

    from training.common import prepare_training

    agent = half.agent
    agent.llm.requires_grad_(False)  # as under LoRA: the LLM frozen, the resamplers trained
    accelerator = SimpleNamespace(state=SimpleNamespace(), mixed_precision="bf16", prepare=lambda *parts: parts,
                                  distributed_type=SimpleNamespace(value="NO"))
    prepare_training(accelerator, agent, OmegaConf.create({"lr": 1e-3, "max_steps": 2}))
    assert {p.dtype for p in agent.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in agent.llm.parameters()} == {torch.bfloat16}
    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)), mixed_precision="bf16")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        prepare_training(fsdp1, agent, OmegaConf.create({"lr": 1e-3, "max_steps": 2}))
    # stages 1 and 3 read the frozen ViT in its dtype and hand its features on in fp32
    from training.common import frozen_features

    pixels = torch.rand(1, 3, half.visual_tokenizer.config.image_size, half.visual_tokenizer.config.image_size)
    assert frozen_features(half.visual_tokenizer, pixels).dtype == torch.float32

    lora = "train.lora={r: 4, alpha: 8, dropout: 0.0}"
    with pytest.raises(ValueError, match="mixed precision"):
        run_stage("stage2_agent", "tiny-stage2.yaml", tmp_path / "no-amp", world, "train.max_steps=2",
                  "model.dtype=bf16", lora)
    # its own process: accelerate keeps one mixed-precision setting per process
    done = subprocess.run([sys.executable, "-m", "training.stage2_agent", "--config",
                           os.path.join(CONFIGS, "tiny-stage2.yaml"), f"output_dir={tmp_path / 'bf16'}", "log_with=[]",
                           "train.max_steps=8", "train.checkpoint_every=100", "model.dtype=bf16",
                           "train.mixed_precision=bf16", lora, *data_overrides(world)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = str(tmp_path / "bf16" / "final")
    steps, total = losses(tmp_path / "bf16", "total_loss")
    assert steps == list(range(1, 9)) and all(map(math.isfinite, total)) and mean(total[-3:]) < mean(total[:3])
    pipe = SeedStoryPipeline.from_pretrained(final, device="cpu", torch_dtype=torch.float32)
    assert pipe.agent.llm.config.num_hidden_layers == full.agent.llm.config.num_hidden_layers
