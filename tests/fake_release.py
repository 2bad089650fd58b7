"""Tiny fakes of the released SEED-Story files, in the exact release formats (docs/formats.md §1-§5).

Builders shared by tests/test_release_checkpoints.py, tests/test_release_pipeline.py and tests/test_doctor.py:

- ``train_sp_model`` / ``write_tokenizer_dir``: a SentencePiece Llama tokenizer folder (``tokenizer.model``,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``) with the image tokens added;
- ``make_peft_agent`` / ``release_agent_state``: an unmerged peft LoRA agent and what zero_to_fp32 wrote for
  it (peft 0.4.0 names, trainable fp32, frozen bf16, ``rotary_emb.inv_freq`` buffers);
- ``write_llama_base``: a Llama base folder in HF layout (safetensors/bin, sharded or not);
- ``write_sdxl_base`` / ``release_detokenizer_state``: an SDXL base folder (``unet/``, ``vae/``,
  ``scheduler/``) and a de-tokenizer file on top of it;
- ``make_fake_release(root)``: a complete ``./pretrained`` tree plus a matching preset YAML (a copy of
  configs/presets/seed-story-george.yaml with tiny sizes and ``release.root`` pointing at the fake);
- ``patch_release``: replace a loader or reader in every checkpoint module that binds it (to forbid loading).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
UNET_TRAINED = re.compile(r"\.attn[12]\.to_[kv]\.weight$")


def image_tokens(n: int = 64) -> list[str]:
    return ["<img>", "</img>"] + [f"<img_{i:05d}>" for i in range(n)]


# -- tokenizer -----------------------------------------------------------------------------------------------

_WORDS = ("george was curious about the big yellow hat man with smiled at they went to park and saw red balloon "
          "climbed tall tree get kite monkey banana city window jumped happy friend played ball water garden "
          "flower bird sky blue green small house door opened found story morning night dog cat ran").split()


def train_sp_model(vocab_size: int = 300, seed: int = 0) -> bytes:
    """A BPE SentencePiece model with Llama's special ids (unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [("[INST] " if i % 2 else "") + " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + "."
             for i in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                                   minloglevel=2)
    return buf.getvalue()


def write_tokenizer_dir(d: str, model: bytes, legacy: Optional[bool] = None, ids: Optional[dict] = None,
                        in_config: bool = False, num_img_tokens: int = 64, first_id: int = 300) -> str:
    """The release layout (transformers 4.x slow save): tokenizer.model, tokenizer_config.json,
    special_tokens_map.json and added_tokens.json (or ``added_tokens_decoder`` in the config)."""
    os.makedirs(d)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(model)
    ids = ids or {t: first_id + i for i, t in enumerate(image_tokens(num_img_tokens))}
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
           "clean_up_tokenization_spaces": False}
    if legacy is not None:
        cfg["legacy"] = legacy
    if in_config:
        cfg["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                                                "single_word": False, "special": False} for t, i in ids.items()}
    else:
        with open(os.path.join(d, "added_tokens.json"), "w") as f:
            json.dump(ids, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return d


# -- agent ----------------------------------------------------------------------------------------------------


def make_peft_agent(base_sd: dict, llm_cfg: dict, vocab: int, agent_cfg: dict, perturb_frozen: bool, seed: int = 1):
    """The unmerged model as the release trained it: real peft LoRA + modules_to_save around a Llama whose
    vocabulary was resized, with non-trivial LoRA B, norms and new embedding rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from seedstory.models.agent import SeedStoryAgent
    from seedstory.models.qwen_resampler import QwenResampler

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(**llm_cfg))
    llm.load_state_dict(base_sd)
    llm.resize_token_embeddings(vocab, mean_resizing=False)
    peft_cfg = LoraConfig(r=int(agent_cfg.get("lora_r") or 4), lora_alpha=int(agent_cfg.get("lora_alpha", 8)),
                          lora_dropout=0.0, target_modules=LORA_TARGETS,
                          modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"])
    llm = get_peft_model(llm, peft_cfg)
    inp = QwenResampler(**agent_cfg["input_resampler"])
    out = QwenResampler(**agent_cfg["output_resampler"])
    with torch.no_grad():
        for n, p in llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            elif "modules_to_save" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in n or "lm_head" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif perturb_frozen and "base_layer" in n:  # a full dump's frozen copies differ from the base folder
                p.copy_((p + 0.05 * torch.randn_like(p)).bfloat16().float())
        if perturb_frozen:  # frozen tensors are stored in bf16
            for m in (inp, out):
                m.pos_embed.copy_(m.pos_embed.bfloat16().float())
    return SeedStoryAgent(llm, inp, out).eval()


def release_agent_state(agent, llm_cfg: dict, trainable_only: bool) -> dict:
    """What zero_to_fp32 wrote: peft-0.4.0 names, trainable fp32, frozen bf16, inv_freq buffers fp32."""
    out = {}
    for k, v in agent.state_dict().items():
        k = k.replace(".base_layer.", ".")  # peft >= 0.7 -> peft 0.4.0 naming
        frozen = bool(BASE_LINEAR.search(k)) or k.endswith("pos_embed")
        if frozen and trainable_only:
            continue
        out[k] = v.to(torch.bfloat16 if frozen else torch.float32).clone()
    hd = llm_cfg["hidden_size"] // llm_cfg["num_attention_heads"]
    inv_freq = (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)).bfloat16().float()
    for i in range(llm_cfg["num_hidden_layers"]):
        out[f"llm.base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def write_llama_base(llm, d: str, layout: str) -> str:
    """Llama-2-7b-hf layouts: safetensors, safetensors_sharded, bin, bin_sharded, or config_only."""
    os.makedirs(d)
    if layout == "safetensors":
        llm.save_pretrained(d)
    elif layout == "safetensors_sharded":
        llm.save_pretrained(d, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    else:
        llm.config.save_pretrained(d)
        sd = {k: v.clone() for k, v in llm.state_dict().items()}
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old HF .bin files carry these
        if layout == "bin":
            torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        elif layout == "bin_sharded":
            keys = sorted(sd)
            halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for name, ks in halves.items():
                torch.save({k: sd[k] for k in ks}, os.path.join(d, name))
            index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
            with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
                json.dump(index, f)
        else:
            assert layout == "config_only"
    return d


# -- de-tokenizer -------------------------------------------------------------------------------------------


def write_sdxl_base(sdxl: str, unet_cfg: dict, vae_cfg: dict, sched_cfg: dict, seed: int = 3):
    """``stable-diffusion-xl-base-1.0/{unet,vae,scheduler}`` in diffusers layout. Returns the UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.save_pretrained(os.path.join(sdxl, "unet"))
    AutoencoderKL(**vae_cfg).save_pretrained(os.path.join(sdxl, "vae"))
    EulerDiscreteScheduler(**sched_cfg).save_pretrained(os.path.join(sdxl, "scheduler"))
    return unet


def release_detokenizer_state(resampler, base_unet_sd: dict, trained: dict, full: bool) -> dict:
    """A de-tokenizer file: every ``resampler.*`` key, the trained UNet attention to_k/to_v (fp32) and, for a
    full dump, the frozen UNet copies in bf16."""
    sd = {"resampler." + k: v.clone() for k, v in resampler.state_dict().items()}
    for k, v in base_unet_sd.items():
        if k in trained:
            sd["unet." + k] = trained[k]
        elif full:
            sd["unet." + k] = v.bfloat16()
    return sd


# -- a complete fake ./pretrained --------------------------------------------------------------------------

SP_VOCAB = 300
LLM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
VIT = dict(image_size=28, patch_size=14, width=16, layers=1, heads=2, mlp_width=32, n_queries=4, output_dim=32,
           pool_heads=2, pos_table_size=4)
DETOK_RESAMPLER = dict(dim=32, depth=1, dim_head=8, heads=4, num_queries=16, embedding_dim=32, output1_dim=16,
                       output2_dim=32, ff_mult=2)
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


def fake_preset(root: str, num_img_tokens: int = 4) -> dict:
    """configs/presets/seed-story-george.yaml with tiny sizes and ``release.root`` = ``root``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "configs", "presets", "seed-story-george.yaml")))
    grid = int(round(num_img_tokens ** 0.5))
    assert grid * grid == num_img_tokens, "num_img_tokens must be a square"
    vit_grid = int(round(VIT["n_queries"] ** 0.5))
    cfg.update(
        name="fake-george",
        description="Tiny fake of the released SEED-Story files (tests)",
        num_img_tokens=num_img_tokens,
        visual_tokenizer=dict(VIT),
        agent=dict(
            input_resampler=dict(grid_size=grid, embed_dim=LLM["hidden_size"], num_heads=4, kv_dim=VIT["output_dim"]),
            output_resampler=dict(grid_size=vit_grid, embed_dim=VIT["output_dim"], num_heads=4,
                                  kv_dim=LLM["hidden_size"]),
            lora=dict(r=4, alpha=8), lm_loss_scale=1.0, rec_loss_scale=1.0,
        ),
        detokenizer=dict(resampler=dict(DETOK_RESAMPLER)),
        generation=dict(num_inference_steps=2, guidance_scale=7.5, scheduler="euler", height=32, width=32, seed=42,
                        window=8, max_new_tokens=6, max_frames=50),
        runtime=dict(device="cpu", dtype="fp32", cpu_offload=False, llm_quantization="none"),
    )
    cfg["release"]["root"] = os.path.abspath(root)
    return cfg


def make_fake_release(root: str, seed: int = 0, num_img_tokens: int = 4, agent_variant: str = "full",
                      preset_path: Optional[str] = None) -> dict:
    """Build a complete tiny ``./pretrained`` tree at ``root`` in the exact release layout:

        cvlm_llama2_tokenizer/                SentencePiece + <img>, </img>, <img_00000>.. (num_img_tokens)
        Llama-2-7b-hf/                        tiny Llama (config.json + model.safetensors, base vocabulary)
        seed_story/george_sft/pytorch_model.bin    peft 0.4.0 names, non-zero LoRA (``agent_variant``: full
                                                   dump with bf16 frozen copies, or trainable-only)
        visual_tokenizer/qwen_vit_G.pt        plain ViT state dict
        stable-diffusion-xl-base-1.0/{unet,vae,scheduler}/
        detokenizer/detokenizer_george_adapted/checkpoint-4000/pytorch_model.bin

    and the matching preset YAML at ``preset_path`` (default ``<root>.yaml``). Returns ``{"root",
    "preset_path", "preset" (dict), "paths" (name -> path), "num_img_tokens", "vocab"}``."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from seedstory.models.qwen_vit import QwenVisionTransformer
    from seedstory.models.resampler_xl import ResamplerXL

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    cfg = fake_preset(root, num_img_tokens)
    rel = cfg["release"]
    paths = {k: os.path.join(root, v) for k, v in rel.items() if k != "root"}
    vocab = SP_VOCAB + len(image_tokens(num_img_tokens))

    write_tokenizer_dir(paths["tokenizer"], train_sp_model(SP_VOCAB, seed), legacy=None,
                        num_img_tokens=num_img_tokens, first_id=SP_VOCAB)

    torch.manual_seed(seed)
    llm_cfg = dict(LLM, vocab_size=SP_VOCAB)
    base = LlamaForCausalLM(LlamaConfig(**llm_cfg)).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    os.makedirs(os.path.dirname(paths["llm_base"]), exist_ok=True)
    write_llama_base(base, paths["llm_base"], "safetensors")
    agent_cfg = {"input_resampler": cfg["agent"]["input_resampler"],
                 "output_resampler": cfg["agent"]["output_resampler"], "lora_r": 4, "lora_alpha": 8}
    agent = make_peft_agent(base_sd, llm_cfg, vocab, agent_cfg, perturb_frozen=agent_variant == "full",
                            seed=seed + 1)
    os.makedirs(os.path.dirname(paths["agent"]), exist_ok=True)
    torch.save(release_agent_state(agent, llm_cfg, trainable_only=agent_variant != "full"), paths["agent"])

    torch.manual_seed(seed + 2)
    vit = QwenVisionTransformer(**VIT)
    os.makedirs(os.path.dirname(paths["visual_tokenizer"]), exist_ok=True)
    torch.save({k: v.clone() for k, v in vit.state_dict().items()}, paths["visual_tokenizer"])

    unet = write_sdxl_base(paths["sdxl_base"], UNET, VAE, SCHED, seed=seed + 3)
    base_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(seed + 4)
    resampler = ResamplerXL(**DETOK_RESAMPLER)
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in base_unet.items() if UNET_TRAINED.search(k)}
    os.makedirs(os.path.dirname(paths["detokenizer"]), exist_ok=True)
    torch.save(release_detokenizer_state(resampler, base_unet, trained, full=True), paths["detokenizer"])

    preset_path = preset_path or root.rstrip(os.sep) + ".yaml"
    OmegaConf.save(OmegaConf.create(cfg), preset_path)
    return {"root": root, "preset_path": preset_path, "preset": cfg, "paths": paths,
            "num_img_tokens": num_img_tokens, "vocab": vocab}


# -- a fake Qwen-VL-Chat download (for extract-vit) -----------------------------------------------------------


def make_fake_qwen_vl_chat(d: str, layout: str = "bin_index", vit_config: Optional[dict] = None, seed: int = 5,
                           n_shards: int = 3) -> dict:
    """A Hugging Face Qwen/Qwen-VL-Chat folder at toy size: ``config.json`` (model_type qwen, a ``visual``
    section) and ``n_shards`` weight shards holding ``transformer.visual.*`` (a tiny ViT) plus some
    ``transformer.h.*``/``wte``/``ln_f``/``lm_head`` LLM tensors. The first shard holds only LLM tensors; the
    visual tensors are spread over the others.

    ``layout``: ``bin_index`` (pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json),
    ``bin_noindex``, ``safetensors_index`` (model-0000k-of-0000n.safetensors + model.safetensors.index.json) or
    ``safetensors_noindex``. Returns ``{"dir", "vit" (the reference QwenVisionTransformer), "shards" (file
    names), "visual_shards" (names holding visual tensors), "llm_shards"}``."""
    from safetensors.torch import save_file

    from seedstory.models.qwen_vit import QwenVisionTransformer

    vit_config = dict(vit_config or VIT)
    torch.manual_seed(seed)
    vit = QwenVisionTransformer(**vit_config).eval()
    h = 24
    llm = {"transformer.wte.weight": torch.randn(50, h), "transformer.ln_f.weight": torch.ones(h),
           "lm_head.weight": torch.randn(50, h)}
    for i in range(2):
        llm[f"transformer.h.{i}.attn.c_attn.weight"] = torch.randn(3 * h, h)
        llm[f"transformer.h.{i}.attn.c_attn.bias"] = torch.randn(3 * h)
        llm[f"transformer.h.{i}.mlp.w1.weight"] = torch.randn(2 * h, h)
    visual = {"transformer.visual." + k: v.to(torch.bfloat16).clone() for k, v in vit.state_dict().items()}
    vkeys = sorted(visual)
    groups = [dict(llm)] + [dict() for _ in range(n_shards - 1)]
    for j, k in enumerate(vkeys):
        groups[1 + j % (n_shards - 1)][k] = visual[k]
    st = layout.startswith("safetensors")
    names = [(f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" if st
              else f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin") for i in range(n_shards)]
    os.makedirs(d, exist_ok=True)
    for name, group in zip(names, groups):
        if st:
            save_file(group, os.path.join(d, name), metadata={"format": "pt"})
        else:
            torch.save(group, os.path.join(d, name))
    if layout.endswith("_index"):
        index = {"metadata": {"total_size": 0},
                 "weight_map": {k: name for name, g in zip(names, groups) for k in g}}
        with open(os.path.join(d, "model.safetensors.index.json" if st else "pytorch_model.bin.index.json"), "w") as f:
            json.dump(index, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": h,
                   "visual": {"image_size": vit_config["image_size"], "width": vit_config["width"],
                              "layers": vit_config["layers"], "output_dim": vit_config["output_dim"]}}, f)
    return {"dir": d, "vit": vit, "shards": names, "visual_shards": names[1:], "llm_shards": names[:1]}


# -- patching the loaders ------------------------------------------------------------------------------------


def patch_release(monkeypatch, name: str, value) -> None:
    """Set ``name`` to ``value`` in every checkpoint module that binds it: where it is defined and where it is
    imported (a loader calls the name its own module holds)."""
    from seedstory.checkpoints import (
        files,
        release,
        release_agent,
        release_detokenizer,
        release_tokenizer,
        release_vit,
        validation,
    )

    modules = [m for m in (files, validation, release_agent, release_vit, release_detokenizer, release_tokenizer,
                           release) if hasattr(m, name)]
    assert modules, f"no checkpoint module has {name}"
    for m in modules:
        monkeypatch.setattr(m, name, value)
