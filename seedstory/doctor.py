"""``python -m seedstory doctor``: check a preset's files in seconds, without loading any weights.

For every file a preset needs: present / missing / wrong (truncated, unknown keys, wrong shapes), read from
safetensors headers or memory-mapped ``torch.load(weights_only=True)`` pickles (tensor data is never read);
where each missing file comes from and where it goes; the tokenizer's image-token ids and ``legacy`` flag; the
dtype and memory of each component; whether that fits the GPU(s) found and which low-VRAM options
(``runtime.cpu_offload``, ``runtime.llm_quantization``) would make it fit.

    report = diagnose("seed-story-george")     # a preset name, YAML path or loaded config
    print(report.format()); report.ok           # False when the preset cannot load
    report_for_preset("seed-story-george")      # markdown, never raises (for the app)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

OK, MISSING, WRONG, WARN, INFO = "ok", "missing", "wrong", "warn", "info"
FAILING = (MISSING, WRONG)
GiB = 2**30

# Rough working memory on top of the weights (CUDA context, activations, KV cache): an estimate, not a bound.
OVERHEAD_FIXED = 1 * GiB
OVERHEAD_FRACTION = 0.15


@dataclass
class Item:
    """One checked file or setting."""

    component: str
    status: str  # ok / missing / wrong / warn / info
    message: str
    path: str = ""
    source: str = ""  # where a missing or wrong file comes from


@dataclass
class Component:
    """Memory a component takes once loaded."""

    name: str
    parameters: int
    dtype: str
    nbytes: float
    note: str = ""
    linear_parameters: int = 0  # the LLM's decoder Linear parameters (what 8-/4-bit quantization shrinks)


@dataclass
class GPU:
    name: str
    total_bytes: int
    free_bytes: Optional[int] = None
    bf16: bool = True


@dataclass
class FitOption:
    flags: str  # the --set flags ("" = as configured)
    peak_bytes: float
    fits: Optional[bool]
    available: bool = True  # False: needs bitsandbytes
    lossless: bool = True


@dataclass
class Report:
    preset: str
    source: str
    root: str = ""
    items: list[Item] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "fp32"
    runtime: dict = field(default_factory=dict)
    gpus: list[GPU] = field(default_factory=list)
    options: list[FitOption] = field(default_factory=list)
    ram_bytes: Optional[int] = None
    seconds: float = 0.0

    def add(self, component: str, status: str, message: str, path: str = "", source: str = "") -> Item:
        item = Item(component, status, message, path, source)
        self.items.append(item)
        return item

    @property
    def problems(self) -> list[Item]:
        return [i for i in self.items if i.status in FAILING]

    @property
    def ok(self) -> bool:
        """True when nothing found stops the preset from loading."""
        return not self.problems

    @property
    def total_bytes(self) -> float:
        return sum(c.nbytes for c in self.components)

    # -- text ------------------------------------------------------------------------------------------------
    def _verdict(self) -> str:
        if self.ok:
            return f"preset {self.preset!r} can load."
        return (f"preset {self.preset!r} cannot load: {len(self.problems)} problem(s) "
                f"({', '.join(sorted({i.component for i in self.problems}))}).")

    def _fit_lines(self) -> list[str]:
        lines = []
        if not self.components:
            return lines
        if self.device != "cuda":
            need = self.total_bytes * (1 + OVERHEAD_FRACTION) + OVERHEAD_FIXED
            ram = f"; this machine has {_gib(self.ram_bytes)} RAM" if self.ram_bytes else ""
            lines.append(f"no CUDA GPU in use: runs on the CPU ({self.device}, {self.dtype}), about {_gib(need)} of "
                         f"RAM{ram}" + (" (not enough)" if self.ram_bytes and need > self.ram_bytes else ""))
            if self.components and self.total_bytes > 8 * GiB:
                lines.append("at release size this is very slow on a CPU; a GPU with 24 GiB or more is advised")
            return lines
        big = max(self.gpus, key=lambda g: g.total_bytes) if self.gpus else None
        if big is not None:
            free = f", {_gib(big.free_bytes)} free" if big.free_bytes is not None else ""
            lines.append(f"GPU: {big.name} ({_gib(big.total_bytes)}{free})"
                         + (f"; {len(self.gpus)} GPUs found, a preset uses one" if len(self.gpus) > 1 else ""))
        for o in self.options:
            flags = o.flags or "as configured"
            verdict = "?" if o.fits is None else ("fits" if o.fits else "does not fit")
            extra = "" if o.available else " (needs: pip install bitsandbytes)"
            lines.append(f"  {flags:62s} ~{_gib(o.peak_bytes):>10s} peak  {verdict}{extra}")
        current = self.options[0] if self.options else None
        if current is not None and current.fits is False:
            fixes = [o for o in self.options[1:] if o.fits and o.available]
            if fixes:
                lines.append(f"to make it fit: --set {fixes[0].flags}"
                             + ("" if fixes[0].lossless else " (quantization changes the outputs slightly)"))
            else:
                lines.append("it does not fit this GPU even with every low-VRAM option; use a larger GPU")
        return lines

    def format(self) -> str:
        out = [f"SEED-Story doctor: preset {self.preset!r} (source: {self.source}"
               + (f", root: {self.root}" if self.root else "") + ")", "", "Files and settings:"]
        width = max([len(i.component) for i in self.items] + [10])
        for i in self.items:
            tag = f"[{i.status.upper() if i.status in FAILING else i.status}]"
            out.append(f"  {tag:9s} {i.component:{width}s}  {i.path}".rstrip())
            out.append(f"  {'':9s} {'':{width}s}  {i.message}")
            if i.source and i.status in FAILING + (WARN,):
                out.append(f"  {'':9s} {'':{width}s}  get it from: {i.source}")
        if self.components:
            out += ["", f"Memory ({self.dtype} on {self.device}; LLM quantization: "
                        f"{self.runtime.get('llm_quantization') or 'none'}, cpu_offload: "
                        f"{bool(self.runtime.get('cpu_offload'))}):"]
            for c in self.components:
                out.append(f"  {c.name:34s} {_count(c.parameters):>9s} params  {c.dtype:5s} {_gib(c.nbytes):>10s}"
                           + (f"  ({c.note})" if c.note else ""))
            out.append(f"  {'total weights':34s} {_count(sum(c.parameters for c in self.components)):>9s}"
                       f"         {'':5s} {_gib(self.total_bytes):>10s}")
            out += [""] + self._fit_lines()
        out += ["", "Verdict: " + self._verdict(), f"(checked in {self.seconds:.1f} s without loading weights)"]
        return "\n".join(out)

    def markdown(self) -> str:
        icon = {OK: "OK", MISSING: "**MISSING**", WRONG: "**WRONG**", WARN: "warn", INFO: "info"}
        out = [f"### Doctor: preset `{self.preset}`", "", f"**{self._verdict()}**", ""]
        if self.root:
            out += [f"Release folder: `{self.root}`", ""]
        out += ["| | component | file | details |", "|---|---|---|---|"]
        for i in self.items:
            msg = i.message.replace("|", "\\|").replace("\n", " ")
            if i.source and i.status in FAILING + (WARN,):
                msg += f" — get it from: {i.source}"
            out.append(f"| {icon.get(i.status, i.status)} | {i.component} | `{i.path}` | {msg} |" if i.path
                       else f"| {icon.get(i.status, i.status)} | {i.component} | | {msg} |")
        if self.components:
            out += ["", f"Memory ({self.dtype} on {self.device}):", "", "| component | parameters | dtype | size |",
                    "|---|---|---|---|"]
            for c in self.components:
                out.append(f"| {c.name} | {_count(c.parameters)} | {c.dtype} | {_gib(c.nbytes)} |")
            out += [""] + [f"    {line}" if line.startswith("  ") else f"- {line}" for line in self._fit_lines()]
        out += ["", f"_Checked in {self.seconds:.1f} s without loading weights (`python -m seedstory doctor "
                    f"--preset {self.preset}`)._"]
        return "\n".join(out)


def _gib(n) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else (f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K")


def _numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= int(d)
        total += n
    return total


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def detect_gpus() -> list[GPU]:
    """The CUDA GPUs this process sees (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free = torch.cuda.mem_get_info(i)[0]
        except Exception:
            free = None
        out.append(GPU(p.name, int(p.total_memory), free, bool(p.major >= 8)))
    return out


def _ram_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# -- runtime --------------------------------------------------------------------------------------------------


def _runtime(report: Report, c: dict, gpus: list[GPU]) -> tuple[str, torch.dtype, bool, Optional[str]]:
    """Device kind, dtype, cpu_offload and quantization the preset would run with here; problems as items."""
    import importlib.util

    from .config import DTYPES, LLM_QUANTIZATION

    rt = dict(c.get("runtime") or {})
    report.runtime = rt
    dev = str(rt.get("device") or "auto")
    if dev == "auto":
        kind = "cuda" if gpus else "cpu"
    else:
        kind = dev.split(":")[0]
        if kind == "cuda" and not gpus:
            report.add("runtime", WRONG, f"runtime.device={dev} but no CUDA GPU was found; use runtime.device=auto")
    name = rt.get("dtype") or "auto"
    if name == "auto":
        dtype = ((torch.bfloat16 if all(g.bf16 for g in gpus) else torch.float16) if kind == "cuda"
                 else torch.float32)
    elif name in DTYPES:
        dtype = DTYPES[name]
        if kind == "cpu" and dtype == torch.float16:
            dtype = torch.float32
    else:
        report.add("runtime", WRONG, f"unknown runtime.dtype {name!r}; use fp32, fp16, bf16 or auto")
        dtype = torch.float32
    offload = rt.get("cpu_offload", False)
    offload = offload if isinstance(offload, bool) else str(offload).lower() in ("true", "yes", "on", "1")
    quant = rt.get("llm_quantization")
    quant = None if quant in (None, False, "none", "None", "") else str(quant).lower()
    if quant is not None:
        if quant not in LLM_QUANTIZATION:
            report.add("runtime", WRONG, f"runtime.llm_quantization={quant!r}: use none, 8bit or 4bit")
            quant = None
        elif kind != "cuda":
            report.add("runtime", WRONG, f"runtime.llm_quantization={quant} needs a CUDA GPU (bitsandbytes); "
                                         "none found: set runtime.llm_quantization=none")
        elif importlib.util.find_spec("bitsandbytes") is None:
            report.add("runtime", WRONG, f"runtime.llm_quantization={quant} needs bitsandbytes: "
                                         "pip install bitsandbytes")
    report.device, report.dtype = kind, _dtype_name(dtype)
    return kind, dtype, bool(offload), quant


# -- release presets ----------------------------------------------------------------------------------------


def _inspect(report: Report, component: str, path: str, source: str):
    """Header of a checkpoint file as meta tensors, or None (with an item saying why)."""
    from .checkpoints.files import CheckpointError, inspect_checkpoint, meta_state

    try:
        info = inspect_checkpoint(path)
    except CheckpointError as e:
        report.add(component, WRONG, str(e), path, source)
        return None
    if info is None:
        report.add(component, WARN, "a legacy (non-zip) pickle: its keys cannot be checked without loading it; "
                                    "it will be checked when the preset loads", path)
        return None
    return meta_state(info), info


def _dtypes(info) -> str:
    counts: dict[str, int] = {}
    for m in info.values():
        name = _dtype_name(m.dtype) if m.dtype is not None else "?"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _check_tokenizer(report: Report, path: str, entry, n_img: int) -> Optional[int]:
    """Image-token ids and legacy flag from the tokenizer files; returns the tokenizer length (or None)."""
    from .checkpoints.release_tokenizer import declared_token_ids, tokenizer_config
    from .tokens import BOI_TOKEN, EOI_TOKEN, IMG_TOKEN

    comp = "tokenizer"
    if not os.path.isdir(path):
        report.add(comp, MISSING, entry.what, path, entry.source)
        return None
    model = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(model):
        report.add(comp, MISSING, "tokenizer.model (the SentencePiece model) is missing", model, entry.source)
        return None
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(open(model, "rb").read())
        sp_size = sp.GetPieceSize()
    except Exception as e:
        report.add(comp, WRONG, f"tokenizer.model is not a SentencePiece model ({type(e).__name__}: {e})", model,
                   entry.source)
        return None
    cfg, declared = {}, {}
    try:
        cfg = tokenizer_config(path)
        declared = declared_token_ids(path, cfg)
    except (ValueError, KeyError, TypeError) as e:
        report.add(comp, WRONG, f"unreadable tokenizer json ({type(e).__name__}: {e})", path, entry.source)
        return None
    names = [BOI_TOKEN, EOI_TOKEN] + [IMG_TOKEN.format(i) for i in range(n_img)]
    lacking = [t for t in names if t not in declared]
    length = max([sp_size] + [i + 1 for i in declared.values()])
    if lacking:
        report.add(comp, WRONG, f"{len(lacking)} of the {len(names)} image tokens are not added tokens of this "
                                f"tokenizer (e.g. {', '.join(lacking[:3])}): is it plain Llama-2's tokenizer rather "
                                "than SEED-Story's cvlm_llama2_tokenizer?", path, entry.source)
        return None
    ids = [declared[t] for t in names]
    clash = [t for t in names if declared[t] < sp_size]
    if len(set(ids)) != len(ids) or clash:
        report.add(comp, WRONG, "image-token ids collide with each other or with SentencePiece pieces "
                                f"({', '.join(clash[:3])})", path, entry.source)
        return None
    img = ids[2:]
    contiguous = img == list(range(img[0], img[0] + n_img))
    legacy = cfg.get("legacy")
    legacy_txt = (f"legacy={legacy} (from tokenizer_config.json)" if legacy is not None
                  else "legacy=True (not set in tokenizer_config.json: the transformers-4.34 default the release ran "
                       "with)")
    report.add(comp, OK, f"{length} tokens; image tokens {BOI_TOKEN}={ids[0]}, {EOI_TOKEN}={ids[1]}, "
                         f"{names[2]}..{names[-1]}=" + (f"{img[0]}..{img[-1]}" if contiguous else "non-contiguous ids")
                         + f"; {legacy_txt}", path)
    return length


def _llm_config(report: Report, path: str, entry) -> Optional[dict]:
    comp = "Llama base"
    if not os.path.isdir(path):
        report.add(comp, MISSING, entry.what, path, entry.source)
        return None
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        report.add(comp, MISSING, "config.json (the Llama architecture) is missing", cfg_path, entry.source)
        return None
    try:
        cfg = json.load(open(cfg_path))
        cfg["hidden_size"], cfg["num_hidden_layers"]
    except (ValueError, KeyError) as e:
        report.add(comp, WRONG, f"not a Llama config.json ({type(e).__name__}: {e})", cfg_path, entry.source)
        return None
    return cfg


def _release_components(report: Report, c: dict, dtype: torch.dtype, quant: Optional[str], plan, vit_shapes,
                        detok_info, llm_cfg, tok_len) -> None:
    """Parameter counts (from the checks, else from configs on the meta device, else the release manifests)."""
    from .checkpoints.quantization import quantized_bytes
    from .checkpoints.release_agent import is_peft_extra
    from .checkpoints.release_detokenizer import diffusers_shapes, sdxl_component_shapes
    from .checkpoints.release_manifests import release_manifest, release_manifest_summary

    ds = torch.finfo(dtype).bits // 8
    comps = []
    if vit_shapes is None:
        from .checkpoints.release_vit import vit_shapes as expected_vit_shapes

        try:
            vit_shapes = expected_vit_shapes(c.get("visual_tokenizer") or {})
        except Exception:
            vit_shapes = None
    if vit_shapes is not None:
        n = _numel(vit_shapes.values())
        comps.append(Component("visual tokenizer (ViT)", n, _dtype_name(dtype), n * ds))

    note = ""
    if plan is not None:
        llm_n, lin_n, res_n = plan.llm_parameters, plan.linear_parameters, plan.resampler_parameters
    else:
        llm_n = lin_n = None
        if llm_cfg is not None:
            try:
                from transformers import LlamaConfig, LlamaForCausalLM

                lc = LlamaConfig(**{**llm_cfg, "vocab_size": tok_len or llm_cfg.get("vocab_size", 32000),
                                    "tie_word_embeddings": False})
                with torch.device("meta"):
                    shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(lc).state_dict().items()}
                llm_n = _numel(shapes.values())
                lin_n = _numel(s for k, s in shapes.items() if ".layers." in k and k.endswith("_proj.weight"))
            except Exception:
                llm_n = None
        if llm_n is None:
            m = {k: s for k, s in release_manifest("agent_seed_story_george_sft").items()
                 if not is_peft_extra(k) and k.startswith("llm.")}
            llm_n = _numel(m.values())
            lin_n = _numel(s for k, s in m.items() if ".layers." in k and k.endswith("_proj.weight"))
            note = "estimated from the release manifest"
        try:
            from .checkpoints.release import release_agent_config
            from .models.qwen_resampler import QwenResampler

            a = release_agent_config(c)
            with torch.device("meta"):
                res_n = sum(p.numel() for name in ("input_resampler", "output_resampler")
                            for p in QwenResampler(**a[name]).parameters())
        except Exception:
            res_n = 0
    llm_bytes = (llm_n - lin_n) * ds + (quantized_bytes(lin_n, quant) if quant else lin_n * ds)
    comps.append(Component("agent (LLM + resamplers)", llm_n + res_n,
                           f"{quant}+{_dtype_name(dtype)}" if quant else _dtype_name(dtype),
                           llm_bytes + res_n * ds, note=note, linear_parameters=lin_n))

    detok_n, vae_n, note = 0, None, ""
    rel = release_paths_safe(c)
    try:
        from .models.resampler_xl import ResamplerXL

        with torch.device("meta"):
            detok_n += sum(p.numel() for p in ResamplerXL(**dict(((c.get("detokenizer") or {}).get("resampler") or {}))
                                                           ).parameters())
    except Exception:
        pass
    unet_shapes = detok_info["unet"] if detok_info else None
    if unet_shapes is None and rel:
        try:
            unet_shapes = sdxl_component_shapes(rel["sdxl_base"], "unet")
        except Exception:
            unet_shapes = None
    if unet_shapes is None:
        unet_cfg = release_manifest_summary("detokenizer_pretrained")["sdxl_unet_config"]
        unet_shapes = dict(diffusers_shapes("unet", json.dumps(unet_cfg, sort_keys=True), "release manifest"))
        note = "UNet estimated from the release manifest"
    detok_n += _numel(unet_shapes.values())
    comps.append(Component("de-tokenizer (resampler + UNet)", detok_n, _dtype_name(dtype), detok_n * ds,
                           note=note))
    try:
        vae_shapes = sdxl_component_shapes(rel["sdxl_base"], "vae") if rel else None
    except Exception:
        vae_shapes = None
    if vae_shapes is None:  # the SDXL VAE architecture
        vae_cfg = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=1024,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        vae_shapes = dict(diffusers_shapes("vae", json.dumps(vae_cfg, sort_keys=True), "SDXL VAE"))
    vae_n = _numel(vae_shapes.values())
    comps.append(Component("VAE (kept in fp32)", vae_n, "fp32", vae_n * 4))
    report.components = comps


def release_paths_safe(c: dict) -> Optional[dict]:
    from .checkpoints.release import release_paths

    try:
        return release_paths(c)
    except Exception:
        return None


def _diagnose_release(report: Report, c: dict, dtype: torch.dtype, quant: Optional[str]) -> None:
    from .checkpoints.files import CheckpointError
    from .checkpoints.release import (
        release_agent_config,
        release_entries,
        release_paths,
        release_root,
    )
    from .checkpoints.release_agent import LLAMA_WEIGHTS, check_release_agent
    from .checkpoints.release_detokenizer import (
        check_release_detokenizer,
        diffusers_weight_files,
        sdxl_component_shapes,
    )
    from .checkpoints.release_vit import check_release_visual_tokenizer
    from .checkpoints.validation import check_state_dict

    report.root = release_root(c)
    paths = release_paths(c)
    entries = release_entries(c)
    if not os.path.isdir(report.root):
        report.add("release folder", MISSING, "the folder the preset's release.root names does not exist; create "
                                              "it and put the files below in it", report.root)
    n_img = int(c.get("num_img_tokens", 64))
    try:
        agent_cfg = release_agent_config(c)
    except ValueError as e:
        report.add("preset", WRONG, str(e))
        agent_cfg = None

    tok_len = _check_tokenizer(report, paths["tokenizer"], entries["tokenizer"], n_img)
    llm_cfg = _llm_config(report, paths["llm_base"], entries["llm_base"])

    # Agent.
    plan, e = None, entries["agent"]
    if not os.path.isfile(paths["agent"]):
        report.add("agent", MISSING, e.what, paths["agent"], e.source)
    else:
        got = _inspect(report, "agent", paths["agent"], e.source)
        if got is not None and llm_cfg is not None and agent_cfg is not None:
            state, info = got
            try:
                plan = check_release_agent(paths["agent"], paths["llm_base"], agent_cfg, vocab_size=tok_len,
                                           state=state)
                kind = ("full dump (frozen weights included)" if not plan.from_base
                        else f"trainable-only: {len(plan.from_base)} weights come from the Llama base folder")
                lora = len(plan.parts["lora_A"])
                r = next(iter(plan.parts["lora_A"].values())).shape[0] if lora else 0
                report.add("agent", OK, f"{len(info)} tensors ({_dtypes(info)}), {kind}; LoRA on {lora} linears "
                                        f"(r={r}, alpha={plan.lora_alpha:g}) merged at load; vocabulary "
                                        f"{plan.llm_config.vocab_size}", paths["agent"])
            except CheckpointError as err:
                report.add("agent", WRONG, str(err), paths["agent"], e.source)
        elif got is not None:
            report.add("agent", WARN, "present; not checked (needs the Llama config.json and the preset's agent "
                                      "section)", paths["agent"])
    if llm_cfg is not None:
        base_dir, e = paths["llm_base"], entries["llm_base"]
        weights = [f for pair in LLAMA_WEIGHTS for f in pair if os.path.isfile(os.path.join(base_dir, f))]
        needed = plan is None or bool(plan.from_base)
        desc = (f"Llama config: hidden {llm_cfg.get('hidden_size')}, {llm_cfg.get('num_hidden_layers')} layers, "
                f"vocabulary {llm_cfg.get('vocab_size')}")
        if weights:
            report.add("Llama base", OK, f"{desc}; weights: {weights[0]}"
                       + ("" if needed else " (not needed: the agent file holds every weight)"), base_dir)
        elif needed and plan is None:
            report.add("Llama base", WARN, f"{desc}; no weights (needed unless the agent file is a full dump)",
                       base_dir, e.source)
        else:
            report.add("Llama base", OK, f"{desc}; no weights, none needed (the agent file holds every weight)",
                       base_dir)

    # Visual tokenizer.
    vit_shapes, e = None, entries["visual_tokenizer"]
    vpath = paths["visual_tokenizer"]
    if not os.path.isfile(vpath):
        report.add("visual tokenizer", MISSING, e.what, vpath, e.source)
    else:
        got = _inspect(report, "visual tokenizer", vpath, e.source)
        if got is not None:
            state, info = got
            try:
                vit_shapes = check_release_visual_tokenizer(vpath, c.get("visual_tokenizer") or {}, state=state)
                report.add("visual tokenizer", OK, f"{len(info)} tensors ({_dtypes(info)}), match the preset's ViT",
                           vpath)
            except CheckpointError as err:
                report.add("visual tokenizer", WRONG, str(err), vpath, e.source)

    # SDXL base.
    sd, e = paths["sdxl_base"], entries["sdxl_base"]
    sdxl_ok = {"unet": False}
    if not os.path.isdir(sd):
        report.add("SDXL base", MISSING, e.what, sd, e.source)
    else:
        for sub in ("unet", "vae"):
            cfg_path = os.path.join(sd, sub, "config.json")
            if not os.path.isfile(cfg_path):
                report.add(f"SDXL {sub}", MISSING, f"{sub}/config.json is missing", cfg_path, e.source)
                continue
            try:
                expected = sdxl_component_shapes(sd, sub)
            except CheckpointError as err:
                report.add(f"SDXL {sub}", WRONG, str(err), cfg_path, e.source)
                continue
            present, missing = diffusers_weight_files(os.path.join(sd, sub))
            if missing or not present:
                report.add(f"SDXL {sub}", MISSING, f"weights missing: {', '.join(os.path.basename(m) for m in missing)}"
                           if missing else "no diffusion_pytorch_model*.safetensors / .bin weights",
                           os.path.join(sd, sub), e.source)
                continue
            shapes, bad = {}, False
            for f in present:
                got = _inspect(report, f"SDXL {sub}", f, e.source)
                if got is None:
                    bad = True
                    break
                shapes.update({k: m.shape for k, m in got[1].items()})
            if bad:
                continue
            try:
                check_state_dict(os.path.join(sd, sub), shapes, expected, what=f"the SDXL {sub} its config describes")
                report.add(f"SDXL {sub}", OK, f"{len(shapes)} tensors, match {sub}/config.json",
                           present[0] if len(present) == 1 else os.path.join(sd, sub))
                if sub == "unet":
                    sdxl_ok["unet"] = True
            except CheckpointError as err:
                report.add(f"SDXL {sub}", WRONG, str(err), os.path.join(sd, sub), e.source)
        sched = os.path.join(sd, "scheduler", "scheduler_config.json")
        if not os.path.isfile(sched):
            report.add("SDXL scheduler", MISSING, "scheduler/scheduler_config.json is missing", sched, e.source)
        else:
            try:
                sc = json.load(open(sched))
                report.add("SDXL scheduler", OK, f"{sc.get('_class_name', '?')} ({sc.get('timestep_spacing', '?')} "
                                                 f"spacing, {sc.get('prediction_type', '?')})", sched)
            except ValueError as err:
                report.add("SDXL scheduler", WRONG, f"unreadable json ({err})", sched, e.source)

    # De-tokenizer.
    detok_info, e = None, entries["detokenizer"]
    dpath = paths["detokenizer"]
    if not os.path.isfile(dpath):
        report.add("de-tokenizer", MISSING, e.what, dpath, e.source)
    else:
        got = _inspect(report, "de-tokenizer", dpath, e.source)
        if got is not None:
            state, info = got
            if not os.path.isfile(os.path.join(sd, "unet", "config.json")):
                report.add("de-tokenizer", WARN, "present; not checked (needs the SDXL unet/config.json)", dpath)
            else:
                try:
                    res_cfg = (c.get("detokenizer") or {}).get("resampler") or {}
                    detok_info = check_release_detokenizer(dpath, sd, res_cfg, state=state)
                    n_unet = sum(k.startswith("unet.") for k in info)
                    report.add("de-tokenizer", OK, f"{len(info)} tensors ({_dtypes(info)}): resampler + {n_unet} UNet "
                                                   f"weights" + (f", {len(detok_info['from_base'])} more from the SDXL "
                                                                 "base UNet" if detok_info["from_base"] else ""), dpath)
                except CheckpointError as err:
                    report.add("de-tokenizer", WRONG, str(err), dpath, e.source)

    _release_components(report, c, dtype, quant, plan, vit_shapes, detok_info, llm_cfg, tok_len)


# -- other presets ----------------------------------------------------------------------------------------------


def _diagnose_random(report: Report, c: dict, dtype: torch.dtype) -> None:
    report.add("weights", INFO, "random weights (source: random): nothing to download")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .models.qwen_resampler import QwenResampler
        from .models.resampler_xl import ResamplerXL
        from .models.qwen_vit import QwenVisionTransformer

        ds = torch.finfo(dtype).bits // 8
        with torch.device("meta"):
            vit = sum(p.numel() for p in QwenVisionTransformer(**c["visual_tokenizer"]).parameters())
            a = dict(c["agent"])
            llm_cfg = dict(a["llm"])
            llm_cfg.setdefault("vocab_size", 260 + int(c.get("num_img_tokens", 64)) + 2)
            agent = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**llm_cfg)).parameters())
            agent += sum(p.numel() for n in ("input_resampler", "output_resampler")
                         for p in QwenResampler(**a[n]).parameters())
            dc = c["detokenizer"]
            detok = sum(p.numel() for m in (ResamplerXL(**dc["resampler"]), UNet2DConditionModel(**dc["unet"]))
                        for p in m.parameters())
            vae = sum(p.numel() for p in AutoencoderKL(**dc["vae"]).parameters())
        report.components = [
            Component("visual tokenizer (ViT)", vit, _dtype_name(dtype), vit * ds),
            Component("agent (LLM + resamplers)", agent, _dtype_name(dtype), agent * ds),
            Component("de-tokenizer (resampler + UNet)", detok, _dtype_name(dtype), detok * ds),
            Component("VAE", vae, _dtype_name(dtype), vae * ds),
        ]
    except Exception as e:  # sizes are a nicety here
        report.add("sizes", INFO, f"sizes not computed ({type(e).__name__}: {e})")


def _diagnose_pretrained(report: Report, c: dict, dtype: torch.dtype) -> None:
    from .checkpoints.files import CheckpointError, safetensors_header
    from .config import resolve_path
    from .pipeline import CONFIG_FILE

    path = resolve_path(str(c.get("path", "")))
    report.root = path
    how = "python -m seedstory convert --release ./pretrained --out DIR (or save_pretrained / the training scripts)"
    if not os.path.isdir(path):
        report.add("model folder", MISSING, "the folder the preset's path names does not exist", path, how)
        return
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        report.add("model folder", WRONG, f"no {CONFIG_FILE}: not a seedstory model folder", path, how)
        return
    parts = {"visual tokenizer (ViT)": ["visual_tokenizer"],
             "agent (LLM + resamplers)": ["agent/llm", "agent/input_resampler", "agent/output_resampler"],
             "de-tokenizer (resampler + UNet)": ["detokenizer/resampler", "detokenizer/unet"],
             "VAE": ["detokenizer/vae"]}
    tok = os.path.join(path, "tokenizer")
    report.add("tokenizer", OK if os.path.isdir(tok) else MISSING, "tokenizer files" if os.path.isdir(tok)
               else "tokenizer/ is missing", tok, how)
    ds = torch.finfo(dtype).bits // 8
    for name, subs in parts.items():
        n, stored, ok = 0, set(), True
        for sub in subs:
            d = os.path.join(path, sub)
            files = [f for f in (os.listdir(d) if os.path.isdir(d) else []) if f.endswith(".safetensors")]
            if not os.path.isfile(os.path.join(d, "config.json")) or not files:
                report.add(name, MISSING, f"{sub}/ needs config.json and .safetensors weights", d, how)
                ok = False
                continue
            for f in files:
                try:
                    info = safetensors_header(os.path.join(d, f))
                except CheckpointError as e:
                    report.add(name, WRONG, str(e), os.path.join(d, f), how)
                    ok = False
                    continue
                n += sum(m.numel for m in info.values())
                stored |= {_dtype_name(m.dtype) for m in info.values() if m.dtype is not None}
        if ok:
            report.add(name, OK, f"{_count(n)} parameters stored as {', '.join(sorted(stored))}", os.path.join(
                path, subs[0].split("/")[0]))
        keep = name == "VAE" and stored == {"fp32"}
        report.components.append(Component(name, n, "fp32" if keep else _dtype_name(dtype), n * (4 if keep else ds)))


# -- fit ---------------------------------------------------------------------------------------------------------


_QUANT_LEVEL = {None: 0, "8bit": 1, "4bit": 2}


def _fit(report: Report, offload: bool, quant: Optional[str], dtype: torch.dtype) -> None:
    """Peak GPU memory as configured and with each low-VRAM option added on top, against the largest GPU.
    With cpu_offload the GPU holds the agent plus the larger of the ViT and the de-tokenizer (with its VAE)."""
    import importlib.util

    from .checkpoints.quantization import quantized_bytes

    if report.device != "cuda" or not report.components:
        return
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    ds = torch.finfo(dtype).bits // 8
    agent = next((c for c in report.components if c.name.startswith("agent")), None)
    lin = agent.linear_parameters if agent else 0
    current_linear = quantized_bytes(lin, quant) if quant else lin * ds
    vit = sum(c.nbytes for c in report.components if c.name.startswith("visual"))
    detok = sum(c.nbytes for c in report.components if c.name.startswith(("de-tok", "VAE")))
    big = max(report.gpus, key=lambda g: g.total_bytes) if report.gpus else None

    def peak(off: bool, q: Optional[str]) -> float:
        a = (agent.nbytes - current_linear + (quantized_bytes(lin, q) if q else lin * ds)) if agent else 0
        weights = a + (max(vit, detok) if off else vit + detok)
        return weights * (1 + OVERHEAD_FRACTION) + OVERHEAD_FIXED

    combos = [(offload, quant)] + [
        (off, q) for off, q in ((True, None), (False, "8bit"), (True, "8bit"), (False, "4bit"), (True, "4bit"))
        if (off, q) != (offload, quant) and off >= offload and _QUANT_LEVEL[q] >= _QUANT_LEVEL[quant]]
    for off, q in combos:
        flags = " ".join(f for f in ("runtime.cpu_offload=true" if off and not offload else "",
                                     f"runtime.llm_quantization={q}" if q and q != quant else "") if f)
        p = peak(off, q)
        report.options.append(FitOption(flags, p, None if big is None else p <= big.total_bytes,
                                        available=has_bnb or q == quant, lossless=q == quant))


# -- entry points -------------------------------------------------------------------------------------------------


def diagnose(cfg: Any, overrides=None, gpus: Optional[list[GPU]] = None) -> Report:
    """Check a preset (name, YAML path, DictConfig or dict) without loading weights. ``gpus``: the GPUs to
    plan for (default: the CUDA GPUs found here)."""
    from .checkpoints.release import plain_config
    from .config import load_preset

    start = time.perf_counter()
    if isinstance(cfg, str):
        cfg = load_preset(cfg, overrides)
    elif overrides:
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(OmegaConf.create(plain_config(cfg)), OmegaConf.from_dotlist(list(overrides)))
    c = plain_config(cfg)
    source = c.get("source", "random")
    report = Report(preset=str(c.get("name", "?")), source=source)
    report.gpus = detect_gpus() if gpus is None else list(gpus)
    report.ram_bytes = _ram_bytes()
    kind, dtype, offload, quant = _runtime(report, c, report.gpus)
    if source == "release":
        _diagnose_release(report, c, dtype, quant)
    elif source == "pretrained":
        _diagnose_pretrained(report, c, dtype)
    elif source == "random":
        _diagnose_random(report, c, dtype)
    else:
        report.add("preset", WRONG, f"unknown source {source!r} (random, pretrained or release)")
    _fit(report, offload, quant, dtype)
    report.seconds = time.perf_counter() - start
    return report


def report_for_preset(name: str, overrides=None, error: Optional[BaseException | str] = None) -> str:
    """Markdown doctor report for a preset, e.g. to show when loading it failed (``error``: the failure, shown
    first). Never raises."""
    head = f"**Loading `{name}` failed:** {error}\n\n" if error else ""
    try:
        return head + diagnose(name, overrides).markdown()
    except Exception as e:  # the report must not hide the original problem
        return head + f"The doctor could not check preset `{name}`: {type(e).__name__}: {e}"


__all__ = ["Component", "FitOption", "GPU", "Item", "Report", "detect_gpus", "diagnose", "report_for_preset"]
