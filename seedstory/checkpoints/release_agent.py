"""The released agent (``seed_story/george_sft/pytorch_model.bin``, ``seedx/checkpoint-30000/pytorch_model.bin``;
docs/formats.md §2): peft 0.4.0 names (``llm.base_model.model.*`` with LoRA A/B, ``modules_to_save`` norms) plus
``input_resampler.*``/``output_resampler.*``, and the Llama-2-7b-hf base folder that supplies what the file
lacks. ``load_release_agent(path, "pretrained/Llama-2-7b-hf", agent_cfg)`` builds a plain ``LlamaForCausalLM``
with the LoRA merged in; ``check_release_agent`` makes the same checks without merging.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .files import CheckpointError, TensorMeta, inspect_checkpoint, meta_state, read_state_dict
from .layout import AGENT_FILES, RELEASE_FILES, require_file
from .validation import (
    assign_state,
    check_state_dict,
    empty_init,
    first_few,
    module_shapes,
    shape_mismatch_error,
    shape_of,
    unknown_keys_error,
)

# -- agent: naming -----------------------------------------------------------------------------------------

LLM_PREFIX = "llm.base_model.model."
RESAMPLER_PREFIXES = ("input_resampler.", "output_resampler.")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("input_layernorm", "post_attention_layernorm", "norm")
_PEFT_MARKERS = (
    (".lora_A.default.", "lora_A"),
    (".lora_B.default.", "lora_B"),
    (".modules_to_save.default.", "saved"),
    (".original_module.", "original"),
    (".base_layer.", "plain"),  # newer peft naming of the frozen base weight; accepted as well
)


def is_peft_extra(key: str) -> bool:
    """Release agent keys with no counterpart in a plain (merged) Llama: LoRA factors, peft's copy of the
    original norms, and the saved RoPE ``inv_freq`` buffers."""
    return ".lora_" in key or ".original_module." in key or key.endswith("rotary_emb.inv_freq")


def agent_release_names(shapes: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    """Map a (LoRA-less) ``SeedStoryAgent`` state dict ``{key: shape}`` to release names: ``llm.X`` ->
    ``llm.base_model.model.X``, the norms -> ``...<norm>.modules_to_save.default.weight``; resampler keys
    are unchanged. The result equals the release manifest minus ``is_peft_extra`` keys."""
    out = {}
    for k, v in shapes.items():
        if k.startswith("llm."):
            k = k[len("llm."):]
            mod, param = k.rsplit(".", 1)
            if mod.rsplit(".", 1)[-1] in MODULES_TO_SAVE:
                k = f"{mod}.modules_to_save.default.{param}"
            k = LLM_PREFIX + k
        out[k] = shape_of(v)
    return out


def _parse_agent_key(key: str) -> tuple[str, str]:
    """-> (kind, target). kind: plain / saved / original / lora_A / lora_B (target: a Llama state-dict key),
    input_resampler / output_resampler (target: resampler key), ignored, unknown."""
    for p in RESAMPLER_PREFIXES:
        if key.startswith(p):
            return p[:-1], key[len(p):]
    if not key.startswith(LLM_PREFIX):
        return "unknown", key
    k = key[len(LLM_PREFIX):]
    if k.endswith("rotary_emb.inv_freq"):
        return "ignored", k  # RoPE is recomputed exactly (docs/formats.md §2)
    for marker, kind in _PEFT_MARKERS:
        if marker in k:
            mod, param = k.split(marker, 1)
            if kind.startswith("lora"):
                return (kind, mod + ".weight") if param == "weight" else ("unknown", key)
            return kind, f"{mod}.{param}"
    return "plain", k


# -- agent: Llama base folder -----------------------------------------------------------------------------

# (sharded index, single file) weight names of a Llama base folder, in the order they are looked for.
LLAMA_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class _LlamaBase:
    """A Llama base folder in HF layout: ``config.json`` plus ``model.safetensors`` / ``pytorch_model.bin``,
    sharded with an index or not. Key lists and shapes come from headers; weights are read per key, only when
    needed."""

    def __init__(self, path: str):
        require_file(os.path.join(path, "config.json"), ("llama2_7b",))
        self.path = path
        self.key_file: dict[str, str] = {}
        self._files: dict[str, Mapping] = {}
        self._headers: dict[str, dict] = {}
        for index, single in LLAMA_WEIGHTS:
            if os.path.isfile(os.path.join(path, index)):
                try:
                    with open(os.path.join(path, index)) as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{os.path.join(path, index)}: not a weight index ({e})") from e
                self.key_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
                break
            if os.path.isfile(os.path.join(path, single)):
                file = os.path.join(path, single)
                self.key_file = {k: file for k in self.header(file)}
                break

    @property
    def missing_files(self) -> list[str]:
        """Shards the index names that are not on disk."""
        return sorted({f for f in self.key_file.values() if not os.path.isfile(f)})

    def config(self):
        from transformers import LlamaConfig

        try:
            return LlamaConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{self.path}/config.json: not a readable Llama config ({e})") from e

    def header(self, file: str) -> dict:
        if file not in self._headers:
            info = inspect_checkpoint(file)
            if info is None:  # legacy pickle: no header to read
                info = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._open(file).items()}
            self._headers[file] = info
        return self._headers[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header(self.key_file[key])[key].shape

    def _open(self, file: str) -> Mapping:
        if file not in self._files:
            self._files[file] = read_state_dict(file)
        return self._files[file]

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._open(self.key_file[key])[key]

    def where(self) -> str:
        return (f"the Llama base folder {self.path}" if self.key_file
                else f"the Llama base folder {self.path} (which has no model*.safetensors / pytorch_model*.bin)")


# -- agent: loading ------------------------------------------------------------------------------------------


@dataclass
class AgentPlan:
    """What ``check_release_agent`` found: everything needed to build the agent, all checked, nothing merged."""

    path: str
    llm_config: object  # transformers LlamaConfig
    expected: dict  # Llama state-dict key -> shape
    parts: dict  # kind -> {target key: tensor (or meta tensor)}
    base: _LlamaBase
    from_base: list  # Llama keys the file lacks, taken from the base folder
    input_resampler: object  # meta-initialized QwenResampler
    output_resampler: object
    resampler_missing: dict  # name -> keys absent from the file (pos_embed: deterministic)
    lora_alpha: float
    lora_r: Optional[int]
    scales: dict

    @property
    def llm_parameters(self) -> int:
        return sum(_numel(s) for s in self.expected.values())

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder's Linear layers (what 8-/4-bit quantization shrinks)."""
        return sum(_numel(s) for k, s in self.expected.items()
                   if ".layers." in k and len(s) == 2 and k.endswith("_proj.weight"))

    @property
    def resampler_parameters(self) -> int:
        return sum(p.numel() for m in (self.input_resampler, self.output_resampler) for p in m.parameters())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _agent_config(config: Mapping) -> dict:
    cfg = dict(config)
    for name in ("input_resampler", "output_resampler"):
        if name not in cfg:
            raise CheckpointError(f"agent config needs {name!r} (QwenResampler kwargs)")
    return cfg


def check_release_agent(
    agent_path: str,
    llm_base_dir: str,
    config: dict,
    vocab_size: Optional[int] = None,
    state: Optional[Mapping[str, torch.Tensor]] = None,
    shards_on_disk: bool = True,
) -> AgentPlan:
    """Every check ``load_release_agent`` makes, without merging (``state``: the file's tensors, or meta
    tensors from ``meta_state(inspect_checkpoint(path))`` to check a file from its header alone). Raises
    CheckpointError; returns an ``AgentPlan``. ``shards_on_disk=False``: the base folder may have only its
    config and weight index so far (``base_shards_needed`` asks which shards to fetch)."""
    from transformers import LlamaForCausalLM

    from ..models.qwen_resampler import QwenResampler

    require_file(agent_path, AGENT_FILES)
    cfg = _agent_config(config)
    if state is None:
        state = read_state_dict(agent_path)
    base = _LlamaBase(llm_base_dir)

    # Architecture: the base config, vocabulary from the file (or vocab_size), untied head (both trained).
    emb_key = LLM_PREFIX + "model.embed_tokens.weight"
    file_vocab = state[emb_key].shape[0] if emb_key in state else None
    if vocab_size is not None and file_vocab is not None and vocab_size != file_vocab:
        raise CheckpointError(f"{agent_path}: embed_tokens has {file_vocab} rows but vocab_size={vocab_size} "
                              "(the tokenizer's length): is the tokenizer the one this agent was trained with?")
    llm_config = base.config()
    for k, v in dict(cfg.get("llm") or {}).items():
        setattr(llm_config, k, v)
    llm_config.vocab_size = vocab_size or file_vocab or llm_config.vocab_size
    llm_config.tie_word_embeddings = False
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_config)
        inp = QwenResampler(**cfg["input_resampler"])
        out = QwenResampler(**cfg["output_resampler"])
    expected = module_shapes(llm)
    del llm

    # Sort the file's keys.
    parts: dict[str, dict[str, torch.Tensor]] = {k: {} for k in
                                                 ("plain", "saved", "lora_A", "lora_B", "input_resampler",
                                                  "output_resampler")}
    unknown = []
    for key in state:
        kind, target = _parse_agent_key(key)
        if kind in ("plain", "saved", "original", "lora_A", "lora_B") and target not in expected:
            kind = "unknown"
        if kind == "unknown":
            unknown.append(key)
        if kind in ("unknown", "ignored", "original"):  # original_module: peft's dead copy of the norm
            continue
        if target in parts[kind]:
            raise CheckpointError(f"{agent_path}: two keys map to {kind} {target} (e.g. {key})")
        parts[kind][target] = state[key]
    if unknown:
        raise unknown_keys_error(agent_path, unknown, "a SEED-Story agent (peft 0.4.0 Llama + resamplers)")

    # Shapes, LoRA pairs, conflicts.
    bad = [(LLM_PREFIX + k, tuple(v.shape), expected[k]) for kind in ("plain", "saved")
           for k, v in parts[kind].items() if tuple(v.shape) != expected[k]]
    both = sorted(set(parts["plain"]) & set(parts["saved"]))
    if both:
        raise CheckpointError(f"{agent_path}: both a plain weight and a modules_to_save copy for {first_few(both)}")
    lora_r = cfg.get("lora_r")
    alpha = float(cfg.get("lora_alpha", 32))
    if set(parts["lora_A"]) != set(parts["lora_B"]):
        odd = sorted(set(parts["lora_A"]) ^ set(parts["lora_B"]))
        raise CheckpointError(f"{agent_path}: LoRA A without B (or B without A) for {first_few(odd)}")
    for k, a in parts["lora_A"].items():
        b, (n_out, n_in) = parts["lora_B"][k], expected[k]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, n_in) or tuple(b.shape) != (n_out, r):
            bad.append((f"{LLM_PREFIX}{k[:-7]}.lora_A/B", (tuple(a.shape), tuple(b.shape)), ((r, n_in), (n_out, r))))
        elif lora_r is not None and r != int(lora_r):
            raise CheckpointError(f"{agent_path}: LoRA rank {r} for {k}, but the config says lora_r={lora_r}")
    if bad:
        raise shape_mismatch_error(agent_path, bad, "the agent's language model")

    # Everything the file lacks must come from the base folder, with the right shapes.
    need = [k for k in expected if k not in parts["plain"] and k not in parts["saved"]]
    lacking = [k for k in need if k not in base]
    if lacking and shards_on_disk:
        raise CheckpointError(
            f"{agent_path} lacks {len(lacking)} parameter(s) of the language model that are not in "
            f"{base.where()} either: {first_few(lacking)}. Put the Llama-2-7b-hf weights there "
            f"({RELEASE_FILES['llama2_7b'].source})."
        )
    gone = sorted({base.key_file[k] for k in need if k in base and not os.path.isfile(base.key_file[k])})
    if gone and shards_on_disk:
        raise CheckpointError(
            f"{llm_base_dir}: {len(gone)} weight shard(s) listed in its index are missing: {first_few(gone)} "
            f"({agent_path} does not hold those weights). Download them again "
            f"({RELEASE_FILES['llama2_7b'].source})."
        )
    for k in need:
        if k in base and os.path.isfile(base.key_file[k]) and base.shape(k) != expected[k]:
            raise CheckpointError(
                f"{llm_base_dir}: {k} has shape {list(base.shape(k))} but the agent needs {list(expected[k])}, "
                f"and {agent_path} does not provide it"
            )

    missing_res = {}
    for name, module in (("input_resampler", inp), ("output_resampler", out)):
        missing_res[name] = check_state_dict(agent_path, parts[name], module_shapes(module),
                                             what=f"the agent's {name}", defaults=("pos_embed",))
    scales = {k: float(cfg[k]) for k in ("lm_loss_scale", "rec_loss_scale") if k in cfg}
    return AgentPlan(agent_path, llm_config, expected, parts, base, need, inp, out, missing_res, alpha,
                     None if lora_r is None else int(lora_r), scales)


def base_shards_needed(agent_path: str, llm_base_dir: str, config: dict) -> Optional[list[str]]:
    """The Llama base weight files (paths under ``llm_base_dir``, from its index) holding the parameters the agent
    file lacks: ``[]`` when the file carries the whole model, None when it lacks some and the folder has no index
    to say where they are (its single weights file is needed). Reads the agent file's header only."""
    info = inspect_checkpoint(agent_path)  # None for a legacy pickle: then the file itself is read
    plan = check_release_agent(agent_path, llm_base_dir, config, state=None if info is None else meta_state(info),
                               shards_on_disk=False)
    if not plan.from_base:
        return []
    if not all(k in plan.base for k in plan.from_base):
        return None
    return sorted({plan.base.key_file[k] for k in plan.from_base})


def load_release_agent(
    agent_path: str,
    llm_base_dir: str,
    config: dict,
    dtype: Optional[torch.dtype] = None,
    vocab_size: Optional[int] = None,
    weightless: bool = False,
):
    """Load a released agent (``seed_story/george_sft`` or ``seedx/checkpoint-30000``) into a
    ``SeedStoryAgent`` whose ``llm`` is a plain ``LlamaForCausalLM`` with the LoRA merged.

    ``llm_base_dir``: Llama-2-7b-hf (HF layout); its ``config.json`` defines the architecture and its weights
    fill whatever the file lacks (a trainable-only file has no frozen base linears). The vocabulary is resized
    to the file's ``embed_tokens`` rows (or ``vocab_size``); rows beyond the base come from the file.
    ``config``: ``input_resampler`` and ``output_resampler`` (QwenResampler kwargs), optional ``llm``
    (LlamaConfig overrides), ``lora_alpha`` (32), ``lora_r`` (checked against the file; read from the
    ``lora_A`` shapes), ``lm_loss_scale``/``rec_loss_scale``.
    Per linear ``W + (lora_alpha / r) * B @ A`` is computed in fp32, then cast to ``dtype`` (default fp32);
    norms use ``modules_to_save.default``; ``original_module`` and ``rotary_emb.inv_freq`` are ignored; base
    weights found in the file override the base folder. A missing ``*_resampler.pos_embed`` (frozen, so
    absent from trainable-only files) is the deterministic 2D sin-cos table. All checks
    (``check_release_agent``) pass before anything is merged. ``weightless``: the checks from the file's header
    (``inspect_checkpoint``) and the structure alone, its parameters on the meta device in ``dtype``."""
    from transformers import LlamaForCausalLM

    from ..models.agent import SeedStoryAgent
    from ..models.qwen_resampler import QwenResampler, sincos_2d

    info = inspect_checkpoint(agent_path) if weightless else None  # None for a legacy pickle: then it is read
    plan = check_release_agent(agent_path, llm_base_dir, config, vocab_size,
                               state=None if info is None else meta_state(info))
    dtype = dtype or torch.float32
    cfg = _agent_config(config)
    parts, base = plan.parts, plan.base
    with empty_init():
        llm = LlamaForCausalLM(plan.llm_config)
        inp = QwenResampler(**cfg["input_resampler"])
        out = QwenResampler(**cfg["output_resampler"])
    if weightless:  # the parameters in the dtype the merge below gives them; the buffers as built
        for module in (llm, inp, out):
            module.load_state_dict({k: torch.empty_like(p, dtype=dtype) for k, p in module.named_parameters()},
                                   strict=False, assign=True)
        return SeedStoryAgent(llm, inp, out, **plan.scales).eval()

    merged = {}
    for k in plan.expected:
        if k in parts["saved"]:
            w = parts["saved"][k]
        elif k in parts["plain"]:
            w = parts["plain"][k]
        else:
            w = base[k]
        if k in parts["lora_A"]:
            a, b = parts["lora_A"][k], parts["lora_B"][k]
            delta = (plan.lora_alpha / a.shape[0]) * (b.float() @ a.float())
            w = (w.float() + delta).to(dtype)
        else:
            w = w.to(dtype=dtype, copy=True)
        merged[k] = w
    llm.load_state_dict(merged, strict=True, assign=True)
    del merged

    for name, module in (("input_resampler", inp), ("output_resampler", out)):
        sub = dict(parts[name])
        if "pos_embed" in plan.resampler_missing[name]:
            sub["pos_embed"] = sincos_2d(module.embed_dim, int(round(module.num_queries**0.5)))
        assign_state(module, sub, dtype)

    return SeedStoryAgent(llm, inp, out, **plan.scales).eval()


__all__ = [
    "AgentPlan", "LLAMA_WEIGHTS", "agent_release_names", "check_release_agent", "is_peft_extra",
    "load_release_agent",
]
