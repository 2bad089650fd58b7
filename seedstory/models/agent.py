"""The agent (MLLM): a causal LM plus an input and an output resampler.

- input_resampler: ViT-space image features [N, 256, D_vit] -> [N, n_slots, H], written into the n_slots
  embedding positions between ``<img>`` and ``</img>`` of context images.
- output_resampler: the LM's final (post-norm) hidden states at the n_slots positions of a generated
  image block [N, n_slots, H] -> ViT-space features [N, 256, D_vit], which both condition the
  de-tokenizer and re-enter the context as that frame's image.

Training (``forward``) returns LM loss + cosine regression loss. Generation is split into primitives
(``prefill``, ``decode_text``, ``image_block``) that the story engine composes and caches.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper,
)

from ..tokens import ImageTokenIds
from .kv import KV, KVWorkspace, kv_length, kv_repeat, kv_row, run_decoder
from .qwen_resampler import QwenResampler

if TYPE_CHECKING:
    from ..prompt import WordForms


_NO_IDS = torch.empty(1, 0, dtype=torch.long)  # the warpers read only the scores


def cosine_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(rec, target) along the feature axis."""
    return (1 - F.cosine_similarity(rec.float(), target.float(), dim=-1, eps=0.0)).mean()


@dataclass
class DecodingConfig:
    """Text decoding: greedy as the release, or sampling with temperature / top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 120
    # The release ends a story when EOS comes instead of a new frame; we never let a frame start with it.
    min_new_tokens: int = 1
    repetition_penalty: float = 1.0  # on ``decode_text``'s ``recent`` ids and the ids written so far
    # "tokens" (transformers); "words": an id also penalizes its twin with/without a leading space;
    # "word_starts": as "words", and only ids that begin a word are penalized (not "r" in "carrying").
    repetition_scope: str = "tokens"


@dataclass
class TextResult:
    ids: list[int]
    stop: str  # "image" (the model opened an image), "eos" or "length"
    kv: KV
    next_logits: Optional[torch.Tensor] = field(default=None, repr=False)  # [V] after the last fed token
    # log p(ids, stop) under the distribution the tokens were drawn from before temperature and top-p (the model's
    # logits with the repetition penalty and the caption masks): what ranks captions drawn for one frame. A caption
    # cut at max_new_tokens ("length") has no stop term.
    logprob: float = 0.0


class SeedStoryAgent(nn.Module):
    config_name = "agent_config.json"

    def __init__(
        self,
        llm: nn.Module,
        input_resampler: QwenResampler,
        output_resampler: QwenResampler,
        lm_loss_scale: float = 1.0,
        rec_loss_scale: float = 1.0,
    ):
        super().__init__()
        self.llm = llm
        self.input_resampler = input_resampler
        self.output_resampler = output_resampler
        self.lm_loss_scale = lm_loss_scale
        self.rec_loss_scale = rec_loss_scale

    @property
    def num_img_tokens(self) -> int:
        return self.input_resampler.num_queries

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # -- embeddings ----------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: Optional[torch.Tensor] = None,
        ids_cmp_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings [B, L, H] with context image slots replaced by resampled features.

        image_embeds: [N, 256, D_vit], one per block marked in ``ids_cmp_mask`` (in order).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if image_embeds is not None and ids_cmp_mask is not None and ids_cmp_mask.any():
            feats = self.input_resampler(image_embeds.to(self.input_resampler.query.dtype))
            feats = feats.reshape(-1, embeds.shape[-1])
            if feats.shape[0] != int(ids_cmp_mask.sum()):
                raise ValueError(
                    f"{image_embeds.shape[0]} images give {feats.shape[0]} slot embeddings but the ids have "
                    f"{int(ids_cmp_mask.sum())} context slots"
                )
            embeds = embeds.masked_scatter(ids_cmp_mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # -- training --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: Optional[torch.Tensor],
        image_embeds: Optional[torch.Tensor],
        embeds_gen_mask: Optional[torch.Tensor],
        embeds_cmp_mask: Optional[torch.Tensor],
        ids_gen_mask: Optional[torch.Tensor],
        ids_cmp_mask: Optional[torch.Tensor],
        return_recon_image_embeds: bool = False,
    ) -> dict:
        """Stage-2 objective: ``lm_loss_scale * LM loss + rec_loss_scale * cosine regression loss``.

        image_embeds [N, 256, D_vit] are the ViT features of every image in the batch, in order;
        ``embeds_cmp_mask``/``embeds_gen_mask`` [N] say which are context inputs and which are targets.
        """
        cmp_embeds = None
        if image_embeds is not None and embeds_cmp_mask is not None and embeds_cmp_mask.any():
            cmp_embeds = image_embeds[embeds_cmp_mask]
        inputs_embeds = self.embed(input_ids, cmp_embeds, ids_cmp_mask)
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
            return_dict=True,
        )
        lm_loss = out.loss if out.loss is not None else inputs_embeds.new_zeros(())
        result = {"lm_loss": lm_loss, "logits": out.logits}
        has_target = image_embeds is not None and embeds_gen_mask is not None and embeds_gen_mask.any()
        if has_target:
            target = image_embeds[embeds_gen_mask]  # [n_gen, 256, D_vit]
            hidden = out.hidden_states[-1][ids_gen_mask].view(target.shape[0], -1, inputs_embeds.shape[-1])
            recon = self.output_resampler(hidden.to(self.output_resampler.query.dtype))
            rec_loss = cosine_loss(recon, target)
            if return_recon_image_embeds:
                result["recon_image_embeds"] = recon
        else:
            # Keep the output resampler in the graph so data-parallel training sees every parameter.
            rec_loss = inputs_embeds.new_zeros(()) + sum(p.sum() * 0.0 for p in self.output_resampler.parameters() if p.requires_grad)
        result["rec_loss"] = rec_loss
        result["total_loss"] = self.lm_loss_scale * lm_loss + self.rec_loss_scale * rec_loss
        return result

    # -- generation primitives -------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        image_embeds: Optional[torch.Tensor] = None,
        ids_cmp_mask: Optional[torch.Tensor] = None,
        kv: Optional[KV | KVWorkspace] = None,
        start_pos: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """Feed ids (context image slots filled from ``image_embeds``) after ``kv``.

        ``start_pos`` is the RoPE position of the first new id; by default the cache length. It differs
        from the cache length once old frames have been evicted from the cache.
        Returns (logits for the next token [V], final hidden states [L, H], new kv).
        """
        input_ids = input_ids.to(self.device).reshape(1, -1)
        if ids_cmp_mask is not None:
            ids_cmp_mask = ids_cmp_mask.to(self.device).reshape(1, -1)
        embeds = self.embed(input_ids, image_embeds.to(self.device) if image_embeds is not None else None, ids_cmp_mask)
        position_ids = None
        if start_pos is not None:
            position_ids = torch.arange(start_pos, start_pos + input_ids.shape[1], device=self.device)[None]
        hidden, kv = run_decoder(self.llm, embeds, kv, position_ids)
        logits = self.llm.get_output_embeddings()(hidden[:, -1]).float()[0]
        return logits, hidden[0], kv

    @staticmethod
    def _warpers(cfg: DecodingConfig) -> Optional[LogitsProcessorList]:
        """transformers' sampling warpers for ``cfg`` (None: greedy, as the release)."""
        if not cfg.do_sample or cfg.temperature <= 0:
            return None
        warpers = LogitsProcessorList([TemperatureLogitsWarper(cfg.temperature)])
        if cfg.top_p < 1.0:
            warpers.append(TopPLogitsWarper(cfg.top_p))  # always keeps the most likely token
        return warpers

    @staticmethod
    def _pick(
        scores: torch.Tensor, warpers: Optional[LogitsProcessorList], generator: Optional[torch.Generator]
    ) -> list[int]:
        """The next id of each row of ``scores`` [n, V]: the argmax, or a draw from the warped distribution with our
        own ``generator`` (``generate`` would draw from torch's global one, so a frame's seed would not decide it)."""
        if warpers is None:
            return scores.argmax(dim=-1).tolist()
        probs = torch.softmax(warpers(_NO_IDS, scores), dim=-1)
        return torch.multinomial(probs.float().cpu(), 1, generator=generator)[:, 0].tolist()

    def decode_text(
        self,
        logits: torch.Tensor,
        kv: KV,
        image_ids: ImageTokenIds,
        eos_id: int,
        cfg: DecodingConfig,
        generator: Optional[torch.Generator] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        start_pos: Optional[int] = None,
        recent: Sequence[int] = (),
        word_forms: Optional[WordForms] = None,
    ) -> TextResult:
        """One caption: ``decode_texts`` with n = 1."""
        return self.decode_texts(logits, kv, image_ids, eos_id, cfg, 1, generator, should_stop=should_stop,
                                 start_pos=start_pos, recent=recent, word_forms=word_forms)[0]

    @torch.no_grad()
    def decode_texts(
        self,
        logits: torch.Tensor,
        kv: KV,
        image_ids: ImageTokenIds,
        eos_id: int,
        cfg: DecodingConfig,
        n: int = 1,
        generator: Optional[torch.Generator] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        start_pos: Optional[int] = None,
        recent: Sequence[int] = (),
        word_forms: Optional[WordForms] = None,
    ) -> list[TextResult]:
        """Decode ``n`` captions at once (one batch) from ``logits``, each until the model opens an image
        (``<img>``), emits EOS, or hits ``max_new_tokens``. The image-block tokens other than ``<img>`` are never
        chosen here; the chosen ``<img>``/EOS is not fed (``image_block`` feeds the whole block at once). With
        ``cfg.repetition_penalty`` > 1, the ids in ``recent`` (the previous frame's text) and those written
        so far are penalized as in CTRL / transformers: positive logits divided, negative ones multiplied.
        ``cfg.repetition_scope`` other than "tokens" needs ``word_forms`` (``PromptFormat.word_forms()``).
        Each result's ``kv`` is ``kv`` and its own text; with n > 1 they are views of one batch buffer, so keep
        one (``kv_slice`` copies) and drop the others."""
        if cfg.repetition_scope != "tokens" and word_forms is None:
            raise ValueError(f"repetition_scope {cfg.repetition_scope!r} needs the tokenizer's word_forms")
        banned = torch.tensor(sorted(image_ids.all - {image_ids.boi}), device=logits.device)
        pos = kv_length(kv) if start_pos is None else start_pos
        ids: list[list[int]] = [[] for _ in range(n)]
        stops: list[Optional[str]] = [None] * n
        logprobs = [0.0] * n
        last_logits: list[Optional[torch.Tensor]] = [None] * n

        def remember(seen: set[int], token: int) -> None:
            if cfg.repetition_scope == "tokens":
                seen.add(token)
            elif cfg.repetition_scope == "words" or token in word_forms.word_starts:
                seen.update((token, word_forms.twin.get(token, token)))

        first: set[int] = set()
        for i in recent:
            if int(i) not in image_ids.all:
                remember(first, int(i))
        seen = [set(first) for _ in range(n)]
        penalty = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty) if cfg.repetition_penalty != 1.0 else None
        warpers = self._warpers(cfg)
        # Tokens are written into one preallocated cache in place: a token's cost does not grow with the story.
        cache = KVWorkspace(kv_repeat(kv, n), room=cfg.max_new_tokens + len(image_ids.block))
        logits = logits.expand(n, -1)  # [n, V]
        step = 0
        while True:
            scores = logits.clone()
            if penalty is not None:
                for row in range(n):
                    if seen[row] and stops[row] is None:
                        scores[row : row + 1] = penalty(torch.tensor([sorted(seen[row])], device=logits.device),
                                                        scores[row : row + 1])
            # Own masks: the minimum length bans the picture's start as well as EOS (transformers' processor knows
            # EOS alone), and the image tokens never appear inside a caption.
            scores[:, banned] = float("-inf")
            if step < cfg.min_new_tokens:
                scores[:, eos_id] = float("-inf")
                scores[:, image_ids.boi] = float("-inf")
            tokens = self._pick(scores, warpers, generator)
            picked = torch.tensor(tokens, device=scores.device)[:, None]
            log_p = torch.log_softmax(scores.float(), dim=-1).gather(1, picked)[:, 0].tolist()  # one sync per step
            for row, token in enumerate(tokens):
                if stops[row] is not None:
                    continue
                logprobs[row] += log_p[row]
                if token in (image_ids.boi, eos_id):
                    stops[row], last_logits[row] = ("image" if token == image_ids.boi else "eos"), logits[row]
                    continue
                ids[row].append(token)
                remember(seen[row], token)
            step += 1
            running = [row for row in range(n) if stops[row] is None]
            # A finished row is fed its last token again so the batch stays in step; what it adds is never read.
            feed = [ids[row][-1] if ids[row] else eos_id for row in range(n)]
            if running:
                fed_logits, _ = self._next_logits(torch.tensor(feed)[:, None], cache, pos)
                pos += 1
                if step >= cfg.max_new_tokens or (should_stop is not None and should_stop()):
                    for row in running:
                        stops[row], last_logits[row] = "length", fed_logits[row]
                logits = fed_logits
            if all(stop is not None for stop in stops):
                break
        base = kv_length(kv)
        return [TextResult(ids[row], stops[row], kv_row(cache.snapshot(), row, base + len(ids[row])), last_logits[row],
                           logprobs[row]) for row in range(n)]

    def _next_logits(self, ids: torch.Tensor, cache: KVWorkspace, pos: int) -> tuple[torch.Tensor, KVWorkspace]:
        """Feed one token per row (``ids`` [n, 1]) at position ``pos`` into ``cache`` in place: logits [n, V]."""
        embeds = self.embed(ids.to(self.device))
        hidden, cache = run_decoder(self.llm, embeds, cache, torch.tensor([[pos]], device=self.device))
        return self.llm.get_output_embeddings()(hidden[:, -1]).float(), cache

    @torch.no_grad()
    def image_block(
        self, kv: KV, image_ids: ImageTokenIds, start_pos: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """Feed ``<img>``, the n image tokens and ``</img>`` in one pass (the release forces them one by
        one; the result is the same). Returns (features [1, 256, D_vit] from the output resampler on the
        post-norm hidden states at the n image-token positions, logits after ``</img>`` [V], new kv)."""
        block = torch.tensor(image_ids.block)
        logits, hidden, kv = self.prefill(block, kv=kv, start_pos=start_pos)
        slots = hidden[1 : 1 + len(image_ids.img)].unsqueeze(0)  # [1, n, H]
        features = self.output_resampler(slots.to(self.output_resampler.query.dtype))
        return features, logits, kv

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        os.makedirs(path, exist_ok=True)
        self.llm.save_pretrained(os.path.join(path, "llm"), safe_serialization=safe_serialization)
        self.input_resampler.save_pretrained(os.path.join(path, "input_resampler"))
        self.output_resampler.save_pretrained(os.path.join(path, "output_resampler"))
        with open(os.path.join(path, self.config_name), "w") as f:
            json.dump({"lm_loss_scale": self.lm_loss_scale, "rec_loss_scale": self.rec_loss_scale}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, weightless: bool = False,
                        **llm_kwargs) -> "SeedStoryAgent":
        """Load a folder written by ``save_pretrained``. ``weightless``: the structure alone, no weights read
        (``checkpoints.validation.without_weights``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..checkpoints.validation import empty_init, from_folder

        cfg_path = os.path.join(path, cls.config_name)
        extra = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        llm_dir = os.path.join(path, "llm")
        if weightless:
            config = AutoConfig.from_pretrained(llm_dir)
            with empty_init():  # in the dtype from_pretrained gives (the saved one by default; rotary tables stay fp32)
                llm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype or config.dtype)
        else:
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch_dtype, **llm_kwargs)
        inp, out = (from_folder(QwenResampler, os.path.join(path, name), torch_dtype, weightless)
                    for name in ("input_resampler", "output_resampler"))
        return cls(llm, inp, out, **extra).eval()

    @classmethod
    def from_config(cls, config: dict) -> "SeedStoryAgent":
        """Random init from a plain dict: ``llm`` (LlamaConfig kwargs), ``input_resampler`` and
        ``output_resampler`` (QwenResampler kwargs), optional loss scales."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = dict(config)
        llm = LlamaForCausalLM(LlamaConfig(**config.pop("llm")))
        inp = QwenResampler(**config.pop("input_resampler"))
        out = QwenResampler(**config.pop("output_resampler"))
        return cls(llm, inp, out, **config)
