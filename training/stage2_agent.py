"""Stage 2: instruction tuning of the agent on stories.

    loss = lm_loss_scale * LM loss (target text, <img>, EOS) + rec_loss_scale * cosine(regressed, ViT features)

``train.lm_loss_scale`` / ``train.rec_loss_scale`` override the agent's own weights of the two losses.
With ``data.text_only`` it reads the stories' text alone (every image slot keeps its placeholder tokens; no
picture is read, the resamplers are frozen, the loss is the LM loss): the agent's text pre-training, as the
release starts from an LLM that already knows language.
The visual tokenizer is frozen. The LLM is tuned with LoRA as the release (r, alpha on the seven
linears; norms, embeddings and LM head fully trained) or fully (small models); the resamplers are
always trained. The exported model has the LoRA merged.

    accelerate launch -m training.stage2_agent --config configs/train/<...>.yaml [--resume] [key=value ...]
"""
from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader
from seedstory.config import resolve_path
from seedstory.data.datasets import StorySampleDataset, collate_story_samples
from seedstory.data.possible import PossibleNext

from .common import (
    count_parameters, export, frozen_features, global_mean, prepare_training, resume, start_stage, train_loop,
    unwrap_trained,
)

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "ids_gen_mask", "ids_cmp_mask", "embeds_gen_mask",
              "embeds_cmp_mask")


def apply_lora(llm, lora_cfg):
    """Wrap the LLM with peft LoRA as the release: seven linears, norms as modules_to_save, embeddings
    and LM head trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora_cfg.r), lora_alpha=int(lora_cfg.alpha), lora_dropout=float(lora_cfg.get("dropout", 0.05)),
        target_modules=list(lora_cfg.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])),
        modules_to_save=list(lora_cfg.get("modules_to_save", ["input_layernorm", "post_attention_layernorm", "norm"])),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(llm, config)
    model.get_input_embeddings().requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)
    return model


def build_data(cfg, pipe, accelerator, target_image_resolution=None):
    """Story samples (docs/formats.md §5) streamed from ``data.train_jsonl``; stage 3 also wants the target
    frame's image at the de-tokenizer's resolution."""
    d = cfg.data
    dataset = StorySampleDataset(
        resolve_path(d.train_jsonl), resolve_path(d.image_root), pipe.prompt, pipe.image_processor,
        max_length=int(d.get("max_length", 1280)), max_frames=d.get("max_frames"), min_given=int(d.get("min_given", 0)),
        seed=int(cfg.train.get("seed", 0)), shuffle_buffer=int(d.get("shuffle_buffer", 256)),
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        target_image_resolution=target_image_resolution, label_context=bool(d.get("label_context", False)),
        text_only=bool(d.get("text_only", False)), opening_share=float(d.get("opening_share", 0.0)),
        learn_own_captions=bool(d.get("learn_own_captions", True)),
        possible_next=PossibleNext(pipe.tokenizer, pipe.prompt.image_ids.boi)
        if float(cfg.train.get("possible_loss_scale") or 0) > 0 else None,
    )
    pad_id = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else pipe.prompt.eos_id
    return DataLoader(dataset, batch_size=int(cfg.train.batch_size), num_workers=int(d.get("num_workers", 0)),
                      collate_fn=partial(collate_story_samples, pad_id=pad_id))


def possible_loss(logits: torch.Tensor, possible_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the positions with possible tokens of -log(their total probability), and the positions' count.
    ``logits`` [B, L, V] predict the next token; ``possible_ids`` [B, L, K] (-1: none) are aligned with the
    tokens, as labels are."""
    ids = possible_ids[:, 1:].to(logits.device)
    given = ids >= 0
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids.clamp(min=0))
    mass = torch.logsumexp(logp.masked_fill(~given, float("-inf")), dim=-1)  # [B, L-1]
    rows = given.any(-1)
    return -(mass[rows]).sum(), rows.sum()


def main(argv=None) -> str:
    args, cfg, acc, out, pipe = start_stage(__doc__, argv, trains=["agent"], unused=["detokenizer"])
    t = cfg.train
    agent, vit = pipe.agent, pipe.visual_tokenizer
    vit.requires_grad_(False).eval().to(acc.device)
    for key in ("lm_loss_scale", "rec_loss_scale"):
        if t.get(key) is not None:
            setattr(agent, key, float(t[key]))
    text_only = bool(cfg.data.get("text_only", False))
    if text_only:  # no picture goes in or comes out
        agent.input_resampler.requires_grad_(False)
        agent.output_resampler.requires_grad_(False)
    lora = t.get("lora")
    if lora:
        agent.llm.requires_grad_(False)
        agent.llm = apply_lora(agent.llm, lora)
    if t.get("gradient_checkpointing"):
        agent.llm.gradient_checkpointing_enable()
    acc.print(f"agent: {count_parameters(agent)}")
    loader = build_data(cfg, pipe, acc)
    agent, optimizer, scheduler, shell = prepare_training(acc, agent, t)
    start = resume(acc, out) if args.resume else 0

    scales = acc.unwrap_model(agent)
    possible_scale = float(t.get("possible_loss_scale") or 0)
    warned: list = []

    def losses(batch):
        # Each process's means weighted by its share of the label tokens and target pictures: N processes
        # train (and log) what one process would with their whole batch.
        tokens = (batch["labels"][:, 1:] != -100).sum()
        image_embeds = None if text_only else frozen_features(vit, batch["pixel_values"])
        result = agent(**{k: batch[k].to(acc.device) for k in BATCH_KEYS}, image_embeds=image_embeds)
        logged = {"lm_loss": global_mean(acc, result["lm_loss"], tokens)}
        total = scales.lm_loss_scale * logged["lm_loss"]
        if not text_only:
            logged["rec_loss"] = global_mean(acc, result["rec_loss"], batch["embeds_gen_mask"].sum())
            total = total + scales.rec_loss_scale * logged["rec_loss"]
        if possible_scale:
            summed, count = possible_loss(result["logits"], batch["possible_ids"])
            if not count and not warned:
                warned.append(True)
                acc.print("train.possible_loss_scale: no caption of this batch follows the synthetic world's grammar, "
                          "so the possible loss is 0 (it is for the synthetic world's stories only)")
            logged["possible_loss"] = global_mean(acc, summed / count.clamp(min=1), count)
            total = total + possible_scale * logged["possible_loss"]
        if len(logged) > 1:
            logged = {"total_loss": total, **logged}
        return logged

    train_loop(acc, agent, optimizer, scheduler, loader, cfg, out, "stage2_agent", start, losses)
    trained = unwrap_trained(acc, agent, shell)
    if lora:
        trained.llm = trained.llm.merge_and_unload()
    pipe.agent = trained.eval().float()
    path = export(acc, pipe, out)
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
