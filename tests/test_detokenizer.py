"""De-tokenizer: conditioning, training forward, sampling through the stock SDXL pipeline, persistence."""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from seedstory.models.detokenizer import SCHEDULERS, TINY_DETOKENIZER_CONFIG, Detokenizer

STEPS = 3
CFG = TINY_DETOKENIZER_CONFIG
N_FEAT, D_FEAT = 24, CFG["resampler"]["embedding_dim"]
Q = CFG["resampler"]["num_queries"]
O1, O2 = CFG["resampler"]["output1_dim"], CFG["resampler"]["output2_dim"]


@pytest.fixture(scope="module")
def detok():
    torch.manual_seed(0)
    return Detokenizer.from_config(CFG).eval()


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, N_FEAT, D_FEAT, generator=g), torch.randn(1, N_FEAT, D_FEAT, generator=g)


def gen(detok, f, neg, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    return detok.generate(f, neg, **kw)


def test_encode_condition_shapes(detok, feats):
    embeds, pooled = detok.encode_condition(feats[0])
    assert embeds.shape == (2, Q, O1 + O2) and pooled.shape == (2, O2)
    assert CFG["unet"]["cross_attention_dim"] == O1 + O2


def test_release_state_dict_prefixes(detok):
    sd = detok.release_state_dict()
    assert {k.split(".")[0] for k in sd} == {"resampler", "unet"}
    assert len(sd) == len(detok.resampler.state_dict()) + len(detok.unet.state_dict())
    assert any(k.startswith("vae.") for k in detok.state_dict())


def test_forward_is_unet_on_resampler_output(detok, feats):
    f = feats[0]
    lat = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        pred = detok(lat, t, f, time_ids)
        embeds, pooled = detok.resampler(f)
        want = detok.unet(lat, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = detok(lat, t, torch.randn_like(f), time_ids)
    assert pred.shape == lat.shape
    torch.testing.assert_close(pred, want, rtol=0, atol=0)
    assert not torch.allclose(pred, other)  # the condition matters


def test_generate_pil_size_and_seeds(detok, feats):
    f, neg = feats[0][:1], feats[1]
    a = detok.generate(f, neg, num_inference_steps=STEPS)
    assert len(a) == 1 and a[0].size == (64, 64) and a[0].mode == "RGB"
    b = detok.generate(f, neg, num_inference_steps=STEPS)
    c = detok.generate(f, neg, num_inference_steps=STEPS, seed=7)
    pa, pb, pc = (np.asarray(x[0], dtype=np.int16) for x in (a, b, c))
    assert pa.std() > 0
    assert np.array_equal(pa, pb)
    assert np.abs(pa - pc).max() > 10


def test_generate_size_override(detok, feats):
    out = gen(detok, feats[0][:1], feats[1], height=32, width=48)
    assert out.shape == (1, 32, 48, 3)


def test_seed_list_per_image(detok, feats):
    f, neg = feats
    both = gen(detok, f, neg, seed=[3, 4])
    assert both.shape == (2, 64, 64, 3)
    # Each image depends only on its own seed and condition, not on its batch position.
    one = gen(detok, f[1:], neg, seed=4)
    np.testing.assert_allclose(both[1], one[0], atol=1e-4)
    assert np.abs(both[0] - both[1]).max() > 0.05
    # A [1, N, D] negative is the same as that negative repeated for the batch.
    rep = gen(detok, f, neg.expand(2, -1, -1), seed=[3, 4])
    np.testing.assert_allclose(both, rep, atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        gen(detok, f, neg, seed=[1, 2, 3])


def test_scheduler_by_name(detok, feats):
    f, neg = feats[0][:1], feats[1]
    default = gen(detok, f, neg)
    euler = gen(detok, f, neg, scheduler="euler")
    np.testing.assert_array_equal(default, euler)  # same class and config as the construction one
    dpm = gen(detok, f, neg, scheduler="dpm++")
    sched = detok.pipeline.scheduler
    assert isinstance(sched, DPMSolverMultistepScheduler) and sched.config.algorithm_type == "dpmsolver++"
    assert sched is detok.get_scheduler("dpm++")  # cached
    assert sched.config.beta_schedule == detok.scheduler.config.beta_schedule == "scaled_linear"
    assert np.abs(dpm - default).max() > 1e-3
    # None goes back to the construction scheduler.
    np.testing.assert_array_equal(gen(detok, f, neg), default)
    assert detok.pipeline.scheduler is detok.scheduler
    assert detok.get_scheduler("dpm++_karras").config.use_karras_sigmas
    assert type(detok.get_scheduler("HeunDiscreteScheduler")).__name__ == "HeunDiscreteScheduler"
    with pytest.raises(ValueError) as err:
        gen(detok, f, neg, scheduler="nope")
    for name in SCHEDULERS:
        assert name in str(err.value)


def test_guidance_needs_negative(detok, feats):
    f = feats[0][:1]
    with pytest.raises(ValueError, match="negative_features"):
        detok.generate(f, num_inference_steps=STEPS, guidance_scale=7.5)
    out = gen(detok, f, None, guidance_scale=1.0)
    assert out.shape == (1, 64, 64, 3)


def test_callback_and_pipeline_reused(detok, feats):
    calls = []
    pipe = detok.pipeline
    gen(detok, feats[0][:1], feats[1], callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert detok.pipeline is pipe


def test_matches_hand_written_diffusers_call(detok, feats):
    """generate() adds nothing to the stock SDXL pipeline."""
    f, neg = feats[0][:1], feats[1]
    ours = gen(detok, f, neg, guidance_scale=5.0, seed=11)
    scheduler = EulerDiscreteScheduler.from_config(detok.scheduler.config)
    pipe = StableDiffusionXLPipeline(vae=detok.vae, unet=detok.unet, scheduler=scheduler, text_encoder=None,
                                     text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, pp = detok.resampler(f)
        ne, npool = detok.resampler(neg)
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp,
                   negative_pooled_prompt_embeds=npool, guidance_scale=5.0, num_inference_steps=STEPS,
                   height=64, width=64, generator=torch.Generator("cpu").manual_seed(11), output_type="np").images
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ours - gen(detok, f, neg, guidance_scale=1.0, seed=11)).max() > 1e-3  # guidance is used


def test_save_load_round_trip(detok, feats, tmp_path):
    f, neg = feats[0][:1], feats[1]
    detok.save_pretrained(tmp_path / "d")
    for sub in ("resampler", "unet", "vae"):
        assert (tmp_path / "d" / sub / "diffusion_pytorch_model.safetensors").is_file()
    loaded = Detokenizer.from_pretrained(str(tmp_path / "d")).eval()
    sd, sd2 = detok.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded.scheduler) is type(detok.scheduler)
    assert public(loaded.scheduler.config) == public(detok.scheduler.config)
    np.testing.assert_array_equal(gen(detok, f, neg, seed=5), gen(loaded, f, neg, seed=5))
    with pytest.raises(FileNotFoundError):
        Detokenizer.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_vae_decodes_in_fp32_whatever_the_unet_dtype(feats, dtype, tmp_path):
    """As the release: SDXL's VAE overflows in fp16. diffusers upcasts only an fp16 VAE itself, and handed a bf16
    UNet's latents to the release loader's fp32 VAE, which raised a dtype error on the first picture."""
    torch.manual_seed(0)
    d = Detokenizer.from_config(CFG).eval().to(dtype)
    seen = []
    hook = d.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    try:
        out = gen(d, feats[0][:1].to(dtype), feats[1].to(dtype), num_inference_steps=2)
    finally:
        hook.remove()
    assert seen == [torch.float32] and d.vae.dtype == torch.float32 and d.unet.dtype == dtype
    assert np.isfinite(out).all() and out.std() > 0
    d.save_pretrained(tmp_path / "d")
    loaded = Detokenizer.from_pretrained(str(tmp_path / "d"), torch_dtype=dtype)
    assert loaded.vae.dtype == torch.float32 and loaded.unet.dtype == dtype
