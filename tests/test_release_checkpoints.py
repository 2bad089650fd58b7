"""Loading the released checkpoints (seedstory.checkpoints.release_*) from tiny fakes in the exact release
formats, plus a full-size meta-device check of our modules' names and shapes against the packaged manifests."""
import os
import re

import pytest
import torch

from fake_release import (
    UNET_TRAINED,
    make_peft_agent,
    release_agent_state,
    release_detokenizer_state,
    train_sp_model,
    write_llama_base,
    write_sdxl_base,
    write_tokenizer_dir,
)
from seedstory.checkpoints.files import CheckpointError, read_state_dict
from seedstory.checkpoints.layout import RELEASE_FILES, release_path
from seedstory.checkpoints.release_agent import agent_release_names, is_peft_extra, load_release_agent
from seedstory.checkpoints.release_detokenizer import (
    detokenizer_release_names,
    load_release_detokenizer,
    load_release_detokenizer_weights,
)
from seedstory.checkpoints.release_manifests import release_manifest, release_manifest_summary
from seedstory.checkpoints.release_tokenizer import load_release_tokenizer
from seedstory.checkpoints.release_vit import load_release_visual_tokenizer
from seedstory.models.agent import SeedStoryAgent
from seedstory.models.qwen_resampler import QwenResampler
from seedstory.models.qwen_vit import QwenVisionTransformer
from seedstory.models.resampler_xl import ResamplerXL

LLM = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
VOCAB = 110  # base 96 rows + "added tokens" whose rows exist only in the agent file
AGENT_CFG = {
    # As released, in and out widths are equal (no kv_proj): 9 ViT tokens -> 4 slots, 4 hidden states -> 9 tokens.
    "input_resampler": dict(grid_size=2, embed_dim=32, num_heads=4, kv_dim=32),
    "output_resampler": dict(grid_size=3, embed_dim=32, num_heads=4, kv_dim=32),
    "lora_alpha": 8,
    "lora_r": 4,
}


def _template(keys):
    return {re.sub(r"\.layers\.\d+\.", ".layers.{i}.", k) for k in keys}


class NotATensor:  # a pickled instance of this must be refused (weights_only)
    pass


# -- tiny agent in the release format ---------------------------------------------------------------------


def _make_reference(base_sd, perturb_frozen: bool) -> SeedStoryAgent:
    """The unmerged model as the release trained it (tests/fake_release.py: make_peft_agent)."""
    return make_peft_agent(base_sd, LLM, VOCAB, AGENT_CFG, perturb_frozen, seed=1)


def _release_state(agent: SeedStoryAgent, trainable_only: bool) -> dict:
    """What zero_to_fp32 wrote: peft-0.4.0 names, trainable fp32, frozen bf16, inv_freq buffers fp32."""
    return release_agent_state(agent, LLM, trainable_only)


def _write_base(llm, d, layout: str) -> str:
    return write_llama_base(llm, d, layout)


@pytest.fixture(scope="module")
def agent_release(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("agent")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLM)).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    bases = {layout: _write_base(base, str(root / layout), layout)
             for layout in ("safetensors", "safetensors_sharded", "bin", "bin_sharded", "config_only")}
    refs, files = {}, {}
    for variant, perturb, trainable_only in (("full", True, False), ("trainable", False, True)):
        refs[variant] = _make_reference(base_sd, perturb)
        files[variant] = str(root / variant / "pytorch_model.bin")
        os.makedirs(os.path.dirname(files[variant]))
        torch.save(_release_state(refs[variant], trainable_only), files[variant])
    return {"root": root, "bases": bases, "refs": refs, "files": files}


def _batch():
    """[BOS] a b <img> 4 slots </img> c d <img> 4 slots </img> [EOS]; first image context, second target."""
    slots = [101, 102, 103, 104]
    ids = [1, 5, 6, 100, *slots, 105, 7, 8, 100, *slots, 105, 2]
    n = len(ids)
    cmp_mask = torch.zeros(n, dtype=torch.bool)
    cmp_mask[4:8] = True
    gen_mask = torch.zeros(n, dtype=torch.bool)
    gen_mask[12:16] = True
    labels = torch.full((n,), -100)
    labels[9:] = torch.tensor(ids[9:])
    labels[12:17] = -100
    torch.manual_seed(5)
    return dict(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, n, dtype=torch.long), labels=labels[None],
        image_embeds=torch.randn(2, 9, 32), embeds_cmp_mask=torch.tensor([True, False]),
        embeds_gen_mask=torch.tensor([False, True]), ids_cmp_mask=cmp_mask[None], ids_gen_mask=gen_mask[None],
    )


def _assert_same_outputs(ref: SeedStoryAgent, agent: SeedStoryAgent):
    batch = _batch()
    with torch.no_grad():
        a = ref(**batch, return_recon_image_embeds=True)
        b = agent(**batch, return_recon_image_embeds=True)
    torch.testing.assert_close(b["logits"], a["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["recon_image_embeds"], a["recon_image_embeds"], atol=1e-4, rtol=1e-4)
    for k in ("lm_loss", "rec_loss"):
        assert abs(float(a[k]) - float(b[k])) < 1e-4, k
    assert float(a["rec_loss"]) > 0 and float(a["lm_loss"]) > 0


def test_fake_agent_files_have_release_key_families(agent_release):
    manifest = release_manifest("seed_story_george_sft", roles=True)
    full = read_state_dict(agent_release["files"]["full"])
    assert _template(full) == _template(manifest)
    trainable = read_state_dict(agent_release["files"]["trainable"])
    assert _template(trainable) == _template(k for k, (_, role) in manifest.items() if role in ("trainable", "buffer"))
    summary = release_manifest_summary("seed_story_george_sft")
    assert summary["if_saved_with_zero1_or_without_frozen_params"]["num_keys"] == sum(
        role in ("trainable", "buffer") for _, role in manifest.values())


def test_full_agent_file_reproduces_unmerged_model(agent_release):
    ref = agent_release["refs"]["full"]
    # A full dump carries the frozen base weights (which here differ from the base folder): they win.
    agent = load_release_agent(agent_release["files"]["full"], agent_release["bases"]["safetensors"], AGENT_CFG)
    _assert_same_outputs(ref, agent)
    assert agent.llm.config.vocab_size == VOCAB and agent.llm.get_input_embeddings().weight.shape[0] == VOCAB
    assert not any("lora" in k for k in agent.state_dict())
    # ... so a base folder with only config.json is enough.
    agent = load_release_agent(agent_release["files"]["full"], agent_release["bases"]["config_only"], AGENT_CFG)
    _assert_same_outputs(ref, agent)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors_sharded", "bin", "bin_sharded"])
def test_trainable_only_agent_file_takes_base_from_llama_folder(agent_release, layout):
    agent = load_release_agent(agent_release["files"]["trainable"], agent_release["bases"][layout],
                               {**AGENT_CFG, "lora_r": None})
    _assert_same_outputs(agent_release["refs"]["trainable"], agent)
    # pos_embed is frozen, hence absent from the file: the deterministic sin-cos table is used.
    ref_inp = agent_release["refs"]["trainable"].input_resampler
    assert torch.equal(agent.input_resampler.pos_embed, ref_inp.pos_embed)


def test_agent_dtype_and_vocab_size(agent_release):
    agent = load_release_agent(agent_release["files"]["full"], agent_release["bases"]["config_only"], AGENT_CFG,
                               dtype=torch.bfloat16, vocab_size=VOCAB)
    assert {p.dtype for p in agent.parameters()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="vocab_size=120"):
        load_release_agent(agent_release["files"]["full"], agent_release["bases"]["config_only"], AGENT_CFG,
                           vocab_size=120)


def test_agent_errors(agent_release, tmp_path):
    files, bases = agent_release["files"], agent_release["bases"]
    # Missing file: names the file, where it goes and where it comes from.
    missing = str(tmp_path / "pretrained" / "seed_story" / "george_sft" / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_release_agent(missing, bases["safetensors"], AGENT_CFG)
    assert missing in str(e.value) and "TencentARC/SEED-Story" in str(e.value)
    assert "AILab-CVC" not in str(e.value)  # the exact entry, not every candidate
    with pytest.raises(CheckpointError, match="meta-llama/Llama-2-7b-hf"):
        load_release_agent(files["full"], str(tmp_path / "no_llama"), AGENT_CFG)
    # Trainable-only file and no base weights: the missing linears are named.
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*|Llama-2-7b-hf") as e:
        load_release_agent(files["trainable"], bases["config_only"], AGENT_CFG)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e.value) and bases["config_only"] in str(e.value)

    state = dict(read_state_dict(files["full"]))
    bad = str(tmp_path / "bad.bin")
    torch.save({**state, "vision_tower.blocks.0.weight": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="vision_tower.blocks") as e:
        load_release_agent(bad, bases["safetensors"], AGENT_CFG)
    assert bad in str(e.value) and "unknown key families" in str(e.value)
    key = "llm.base_model.model.model.layers.1.mlp.up_proj.weight"
    torch.save({**state, key: torch.zeros(48, 31)}, bad)
    with pytest.raises(CheckpointError) as e:
        load_release_agent(bad, bases["safetensors"], AGENT_CFG)
    assert key in str(e.value) and "[48, 31]" in str(e.value) and "[48, 32]" in str(e.value)
    with pytest.raises(CheckpointError, match="lora_r=8"):
        load_release_agent(files["full"], bases["safetensors"], {**AGENT_CFG, "lora_r": 8})
    wrong_res = {**AGENT_CFG, "output_resampler": dict(grid_size=2, embed_dim=32, num_heads=4, kv_dim=32)}
    with pytest.raises(CheckpointError, match="query"):
        load_release_agent(files["full"], bases["safetensors"], wrong_res)
    # Extra vocabulary rows exist only in the agent file; a file without them cannot be completed.
    torch.save({k: v for k, v in state.items() if "embed_tokens" not in k}, bad)
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has shape \[96, 32\]"):
        load_release_agent(bad, bases["safetensors"], AGENT_CFG, vocab_size=VOCAB)
    no_b = {k: v for k, v in state.items() if not k.endswith("o_proj.lora_B.default.weight")}
    torch.save(no_b, bad)
    with pytest.raises(CheckpointError, match="LoRA A without B"):
        load_release_agent(bad, bases["safetensors"], AGENT_CFG)


# -- visual tokenizer --------------------------------------------------------------------------------------

VIT = dict(image_size=28, patch_size=14, width=16, layers=1, heads=2, mlp_width=32, n_queries=4, output_dim=16,
           pool_heads=2, pos_table_size=4)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(2)
    return QwenVisionTransformer(**VIT).eval()


@pytest.mark.parametrize("fmt", ["pt", "pt_legacy_pickle", "safetensors", "wrapped"])
def test_visual_tokenizer_round_trip(tiny_vit, tmp_path, fmt):
    sd = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    path = str(tmp_path / ("qwen_vit_G.safetensors" if fmt == "safetensors" else "qwen_vit_G.pt"))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    elif fmt == "pt_legacy_pickle":  # not a zip: no mmap
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save({"state_dict": sd} if fmt == "wrapped" else sd, path)
    vit = load_release_visual_tokenizer(path, VIT)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(vit(x), tiny_vit(x))


def test_visual_tokenizer_errors(tiny_vit, tmp_path):
    sd = dict(tiny_vit.state_dict())
    path = str(tmp_path / "vit.pt")
    torch.save({**sd, "proj": torch.zeros(16, 8)}, path)
    with pytest.raises(CheckpointError) as e:
        load_release_visual_tokenizer(path, VIT)
    assert "proj" in str(e.value) and "[16, 8]" in str(e.value) and "[16, 16]" in str(e.value)
    assert path in str(e.value)
    torch.save({k: v for k, v in sd.items() if k != "ln_post.bias"}, path)
    with pytest.raises(CheckpointError, match="ln_post.bias"):
        load_release_visual_tokenizer(path, VIT)
    torch.save({**sd, "text.embed.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unknown key families: text.embed"):
        load_release_visual_tokenizer(path, VIT)
    with pytest.raises(CheckpointError) as e:
        load_release_visual_tokenizer(str(tmp_path / "pretrained/visual_tokenizer/qwen_vit_G.pt"), VIT)
    assert "Qwen/Qwen-VL-Chat" in str(e.value) and "visual_tokenizer/qwen_vit_G.pt" in str(e.value)


def test_read_state_dict_refuses_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 8)
    with pytest.raises(CheckpointError, match="corrupt.bin"):
        read_state_dict(str(corrupt))
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        read_state_dict(str(text))
    with pytest.raises(CheckpointError, match="safetensors"):
        (tmp_path / "x.safetensors").write_bytes(b"\x00" * 20)
        read_state_dict(str(tmp_path / "x.safetensors"))
    obj = tmp_path / "object.bin"
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, str(obj))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(str(obj))
    plain = tmp_path / "plain.bin"
    torch.save({"weight": torch.zeros(2), "step": 3}, str(plain))
    with pytest.raises(CheckpointError, match="'step' is a int"):
        read_state_dict(str(plain))
    torch.save({"module": {"w": torch.ones(1)}}, str(plain))
    assert list(read_state_dict(str(plain))) == ["w"]
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(str(tmp_path / "nope.bin"))


def test_release_paths():
    assert release_path("seed_story_george_sft", "/x", check=False) == "/x/seed_story/george_sft/pytorch_model.bin"
    with pytest.raises(CheckpointError) as e:
        release_path("detokenizer_george_adapted", "/nonexistent/pretrained")
    assert "detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin" in str(e.value)
    assert "TencentARC/SEED-Story" in str(e.value)
    for f in RELEASE_FILES.values():
        assert f.source and f.what


# -- de-tokenizer ----------------------------------------------------------------------------------------

RES = dict(dim=32, depth=1, dim_head=8, heads=4, num_queries=16, embedding_dim=32, output1_dim=16, output2_dim=32,
           ff_mult=2)
UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=8, cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32,
           sample_size=32)
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             timestep_spacing="leading", steps_offset=1, prediction_type="epsilon")


@pytest.fixture(scope="module")
def detok_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    sdxl = root / "stable-diffusion-xl-base-1.0"
    unet = write_sdxl_base(str(sdxl), UNET, VAE, SCHED, seed=3)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    resampler = ResamplerXL(**RES)
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items() if UNET_TRAINED.search(k)}
    files = {}
    for variant in ("full", "trainable"):
        files[variant] = str(root / variant / "pytorch_model.bin")
        os.makedirs(os.path.dirname(files[variant]))
        torch.save(release_detokenizer_state(resampler, base, trained, full=variant == "full"), files[variant])
    return {"sdxl": str(sdxl), "files": files, "base": base, "trained": trained, "resampler": resampler}


@pytest.mark.parametrize("variant", ["full", "trainable"])
def test_detokenizer_round_trip(detok_release, variant):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    r = detok_release
    resampler, unet, vae, scheduler = load_release_detokenizer(r["files"][variant], r["sdxl"], RES)
    assert isinstance(vae, AutoencoderKL) and isinstance(scheduler, EulerDiscreteScheduler)
    assert vae.dtype == torch.float32 and scheduler.config.timestep_spacing == "leading"
    for k, v in r["resampler"].state_dict().items():
        assert torch.equal(resampler.state_dict()[k], v), k
    got = unet.state_dict()
    for k, v in r["base"].items():
        if k in r["trained"]:
            want = r["trained"][k]
        else:
            want = v.bfloat16().float() if variant == "full" else v
        assert torch.equal(got[k], want), k
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        a, b = resampler(x), r["resampler"](x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_detokenizer_weights_onto_existing_modules(detok_release):
    from diffusers import UNet2DConditionModel

    r = detok_release
    unet = UNet2DConditionModel.from_pretrained(r["sdxl"], subfolder="unet").to(torch.bfloat16)
    resampler = ResamplerXL(**RES)
    load_release_detokenizer_weights(r["files"]["trainable"], resampler, unet)
    key = next(iter(r["trained"]))
    assert unet.state_dict()[key].dtype == torch.bfloat16
    assert torch.equal(unet.state_dict()[key], r["trained"][key].bfloat16())


def test_detokenizer_errors(detok_release, tmp_path):
    r = detok_release
    sd = dict(read_state_dict(r["files"]["trainable"]))
    bad = str(tmp_path / "detok.bin")
    torch.save({**sd, "text_encoder.embeddings.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="unknown key families: text_encoder.embeddings"):
        load_release_detokenizer(bad, r["sdxl"], RES)
    key = "unet." + next(iter(r["trained"]))
    torch.save({**sd, key: torch.zeros(5, 5)}, bad)
    with pytest.raises(CheckpointError) as e:
        load_release_detokenizer(bad, r["sdxl"], RES)
    assert key[len("unet."):] in str(e.value) and "[5, 5]" in str(e.value)
    torch.save({k: v for k, v in sd.items() if k != "resampler.latents"}, bad)
    with pytest.raises(CheckpointError, match="latents"):
        load_release_detokenizer(bad, r["sdxl"], RES)
    with pytest.raises(CheckpointError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        load_release_detokenizer(r["files"]["full"], str(tmp_path / "no_sdxl"), RES)
    with pytest.raises(CheckpointError, match="detokenizer_pretrained/checkpoint-55000"):
        load_release_detokenizer(str(tmp_path / "missing.bin"), r["sdxl"], RES)


def test_trainable_detokenizer_keys_are_resampler_and_attention_kv():
    m = release_manifest("detokenizer_pretrained", roles=True)
    trainable = {k for k, (_, role) in m.items() if role == "trainable"}
    assert trainable == {k for k in m if k.startswith("resampler.") or UNET_TRAINED.search(k)}
    assert len(trainable) == 342


# -- full size on the meta device ----------------------------------------------------------------------------


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_full_size_modules_match_release_manifests():
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    summary = release_manifest_summary("detokenizer_pretrained")
    assert "sdxl_unet_config" in summary
    with torch.device("meta"):
        vit = QwenVisionTransformer()
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=32066, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                           rms_norm_eps=1e-5, tie_word_embeddings=False))
        inp = QwenResampler(grid_size=8, embed_dim=4096, num_heads=32, kv_dim=4096)
        out = QwenResampler(grid_size=16, embed_dim=4096, num_heads=32, kv_dim=4096)
        resampler = ResamplerXL()
        unet = UNet2DConditionModel.from_config(summary["sdxl_unet_config"])

    assert _shapes(vit) == release_manifest("qwen_vit_G")

    for name in ("agent_seed_story_george_sft", "agent_seedx_pretrained"):
        manifest = release_manifest(name)
        assert len(manifest) == release_manifest_summary(name)["total_keys"] == 856
        ours = agent_release_names(_shapes(SeedStoryAgent(llm, inp, out)))
        assert ours == {k: v for k, v in manifest.items() if not is_peft_extra(k)}
        for k, shape in manifest.items():  # LoRA factors: [16, in] and [out, 16] around each base linear
            if ".lora_A." in k:
                w = manifest[k.replace("lora_A.default.", "")]
                assert shape == (16, w[1]) and manifest[k.replace("lora_A", "lora_B")] == (w[0], 16)

    for name in ("detokenizer_pretrained", "detokenizer_george_adapted"):
        assert detokenizer_release_names(_shapes(resampler), _shapes(unet)) == release_manifest(name)


# -- tokenizer ----------------------------------------------------------------------------------------------

IMAGE_TOKENS = ["<img>", "</img>"] + [f"<img_{i:05d}>" for i in range(64)]


@pytest.fixture(scope="module")
def sp_model():
    return train_sp_model(300, seed=0)


def _tokenizer_dir(d, model: bytes, legacy=None, ids=None, in_config=False):
    """The release layout (transformers 4.x slow save), tests/fake_release.py: write_tokenizer_dir."""
    return write_tokenizer_dir(d, model, legacy, ids, in_config)


@pytest.mark.parametrize("legacy", [True, False, None])
def test_tokenizer_legacy_and_image_ids(sp_model, tmp_path, legacy):
    from seedstory.prompt import PromptFormat
    from seedstory.tokens import ImageTokenIds

    tok = load_release_tokenizer(_tokenizer_dir(str(tmp_path / "tok"), sp_model, legacy))
    assert tok.legacy is (legacy is not False)  # absent -> True, as transformers 4.34 defaulted
    ids = ImageTokenIds.from_tokenizer(tok, 64)
    assert (ids.boi, ids.eoi, ids.img[0], ids.img[-1]) == (300, 301, 302, 365) and len(tok) == 366
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "George was curious.<img><img_00000></img>[INST]The hat"
    pieces = tok.convert_ids_to_tokens(tok.encode(text))
    assert pieces[:5] == ["<s>", "\u2581George", "\u2581was", "\u2581curious", "."]
    after = pieces[pieces.index("</img>") + 1]
    assert after == ("\u2581[" if legacy is not False else "[")
    alone = tok.convert_ids_to_tokens(tok.encode("[INST]The hat", add_special_tokens=False))
    assert alone[:3] == ["\u2581[", "INST", "]"]
    assert tok.decode(tok.encode("George was curious."), skip_special_tokens=True) == "George was curious."
    PromptFormat(tok, 64)
    out = str(tmp_path / "resaved")
    tok.save_pretrained(out)
    again = load_release_tokenizer(out)
    assert again.encode(text) == tok.encode(text) and again.legacy == tok.legacy


def test_tokenizer_ids_come_from_files(sp_model, tmp_path):
    from seedstory.tokens import ImageTokenIds

    # The other possible layout: <img_k> = 300 + k, then <img>, </img>; declared in tokenizer_config.json.
    alt = {f"<img_{i:05d}>": 300 + i for i in range(64)}
    alt.update({"<img>": 364, "</img>": 365})
    tok = load_release_tokenizer(_tokenizer_dir(str(tmp_path / "tok"), sp_model, False, alt, in_config=True))
    ids = ImageTokenIds.from_tokenizer(tok, 64)
    assert (ids.boi, ids.eoi, ids.img[0], ids.img[-1]) == (364, 365, 300, 363)


def test_tokenizer_errors(sp_model, tmp_path):
    few = {t: 300 + i for i, t in enumerate(IMAGE_TOKENS[:10])}
    with pytest.raises(CheckpointError, match="<img_00008>"):
        load_release_tokenizer(_tokenizer_dir(str(tmp_path / "few"), sp_model, False, few))
    with pytest.raises(CheckpointError) as e:
        load_release_tokenizer(str(tmp_path / "pretrained" / "cvlm_llama2_tokenizer"))
    assert "cvlm_llama2_tokenizer" in str(e.value) and "TencentARC/SEED-Story" in str(e.value)
