"""What every stage shares: config, accelerator, logging, checkpoints and resume, model loading/export.

A run directory holds ``checkpoints/checkpoint_<n>/`` (accelerate state: model, optimizer, scheduler,
RNG, plus ``trainer_state.json``), ``logs/`` (TensorBoard) and ``losses.csv``, and ``final/`` (the
exported model in the ``from_pretrained`` format the story engine loads).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import re
import shutil
import time
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from seedstory.atomic import write_dir, write_json
from seedstory.config import DTYPES, resolve_path
from seedstory.pipeline import COMPONENTS, SeedStoryPipeline

if not torch.accelerator.is_available():
    # DeepSpeed, which accelerate imports once it is installed, otherwise warns on every run that it found no GPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (configs/train/...)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


Parts = Union[Sequence[str], Callable[[DictConfig], Sequence[str]]]


def start_stage(doc: str, argv=None, trains: Parts = (), unused: Parts = ()):
    """What every stage does first: its command line (the docstring's second line describes it), the config with
    its overrides, the accelerator (and the run folder), then the model to start from. ``trains``: the pipeline's
    components the stage prepares; ``unused``: those it neither runs nor trains, which only the main process
    exports (each a list, or a function of the config giving one). The other processes load without weights
    what they do not use and, where the main process's copy fills it in (``loads_from_main``), what they train.
    Returns (args, cfg, accelerator, out_dir, pipe)."""
    args = parse_args(doc.splitlines()[1], argv)
    cfg = load_config(args.config, args.overrides)
    acc, out = make_accelerator(cfg)
    trained, idle = (tuple(p(cfg) if callable(p) else p) for p in (trains, unused))
    weightless = () if acc.is_main_process else idle + (trained if loads_from_main(acc) else ())
    with loading_whole(acc):
        pipe = load_pipeline(cfg, weightless)
    empty = [p for p in COMPONENTS  # (random presets are drawn whole)
             if p in weightless and any(w.is_meta for w in getattr(pipe, p).parameters())]
    if empty:
        why = {p: "its shards come from process 0" if p in trained else "not used here" for p in empty}
        print(f"process {acc.process_index} loads without weights: "
              + ", ".join(f"{p} ({why[p]})" for p in empty), flush=True)
    return args, cfg, acc, out, pipe


def loads_from_main(accelerator) -> bool:
    """Whether the processes other than the main one may load what the stage trains without weights: under FSDP 2
    with ``fsdp_cpu_ram_efficient_loading``, preparing the model shards it from its shapes and sends each process
    its share of the main process's weights; DeepSpeed ZeRO-3 overwrites every parameter with the main process's
    (a broadcast) before it keeps its partition. Then only the main process holds the whole model in host memory
    while it loads (a release-size pipeline in bf16: about 25 GB)."""
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None:
        return fsdp.fsdp_version == 2 and bool(fsdp.cpu_ram_efficient_loading)
    return shards_weights(accelerator)


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a shard of every weight (FSDP, DeepSpeed ZeRO-3)."""
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type.value == "FSDP" or (deepspeed is not None and deepspeed.zero_stage == 3)


def allocate_weightless(model: torch.nn.Module) -> None:
    """Give ``model``'s meta parameters storage (uninitialised: the pages stay unused until written), for DeepSpeed
    ZeRO-3, which receives the main process's values into each parameter in turn and keeps only its partition. A
    parameter registered twice (tied) stays one."""
    given: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in given:
                    given[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                      requires_grad=p.requires_grad)
                module._parameters[name] = given[id(p)]


@contextlib.contextmanager
def loading_whole(accelerator):
    """The pipeline loads as seedstory asks (whole, or the parts ``start_stage`` names without weights), not as
    transformers' engine integrations would: under DeepSpeed ZeRO-3 it loads every LLM already partitioned, and
    under FSDP with ``fsdp_cpu_ram_efficient_loading`` on the meta device on every process but each node's first,
    frozen parts (which each process runs whole) included: empty tensors, which the pipeline's checks and other
    components cannot use."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if efficient is not None:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if plugin is not None:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if plugin is not None:
            plugin.set_deepspeed_weakref()
        if efficient is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient


def load_config(path: str, overrides: Optional[list[str]] = None) -> DictConfig:
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def engine_mismatch(env, distributed_type: str) -> Optional[str]:
    """Why the engine the launch config asked for (FSDP, DeepSpeed) is not the one set up, or None. On CPUs
    accelerate runs FSDP only as seedstory switches it on (``fsdp_on_cpus``: FSDP 2) and DeepSpeed only when not
    told the processes run on CPUs: otherwise such a launch would quietly train with plain DDP, not sharded."""
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if str(env.get(variable, "false")).lower() == "true" and distributed_type != name.upper():
            how = ("FSDP runs on CPUs as FSDP 2 only: set fsdp_version: 2 in the launch config, or launch without it"
                   if name == "FSDP" else "on CPUs DeepSpeed needs several processes and no train.cpu; or launch "
                                          "without that config")
            return (f"the launch config asks for {name}, but accelerate set these processes up as "
                    f"{distributed_type}: {how} (torchrun --nproc_per_node N, or configs/accelerate/cpu.yaml: "
                    "plain data parallelism, which trains the same model)")
    return None


def fsdp_on_cpus(accelerator) -> None:
    """Switch CPU processes whose launch config asks for FSDP 2 to it. accelerate sets FSDP
    up for GPU-type processes only, while torch's FSDP 2 (``fully_shard``) also shards across CPU processes
    (gloo): with the switch, CI and CPU clusters run the FSDP path of a GPU launch (sharding, sharded
    checkpoints, the gathered export). The plugin is read from the launch config's environment, as accelerate
    reads it on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (accelerator.distributed_type != DistributedType.MULTI_CPU
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        return  # engine_mismatch says what to set
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    # AcceleratorState re-reads the process's shared state whenever it is made again (e.g. by save_state)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def deepspeed_from_config(accelerator, t: DictConfig) -> None:
    """Under DeepSpeed, the training config is the one source of the batch size, the accumulation and the
    clipping: DeepSpeed's config takes them from it (accelerate fills in ``auto`` batch sizes only from a
    prepared DataLoader, and the stages prepare no loader: each process reads its share of one stream)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    micro, steps = int(t.batch_size), int(t.get("gradient_accumulation_steps", 1))
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=steps,
                                   train_batch_size=micro * steps * accelerator.num_processes,
                                   gradient_clipping=float(t.get("max_grad_norm") or 0.0))


def _accelerator(cfg: DictConfig, out: str, cpu: bool, backend: Optional[str] = None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    t = cfg.train
    return Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if backend else None,
        mixed_precision=t.get("mixed_precision"),  # None: the accelerate launch config decides
        gradient_accumulation_steps=int(t.get("gradient_accumulation_steps", 1)),
        log_with=list(cfg.get("log_with", ["tensorboard"])) or None,
        project_config=ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "logs")),
        cpu=cpu,
        # One schedule step per optimizer step whatever the number of processes: the schedule is the one a
        # single process follows (accelerate would otherwise step it once per process).
        step_scheduler_with_optimizer=False,
    )


def make_accelerator(cfg: DictConfig):
    from accelerate.utils import set_seed

    out = resolve_path(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    t = cfg.train
    asked = int(os.environ.get("WORLD_SIZE", "1"))  # what the launcher (torchrun, accelerate, mpirun) started
    # Without a GPU, accelerate joins the processes (gloo) only when told they run on CPUs; otherwise each one
    # trains alone as "rank 0 of 1". Told so, it never sets DeepSpeed up, which itself runs on CPUs over gloo:
    # DeepSpeed launches are given the backend instead.
    cpu_processes = asked > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = bool(t.get("cpu", False)) or (cpu_processes and not deepspeed)
    try:
        acc = _accelerator(cfg, out, cpu, backend="gloo" if cpu_processes and deepspeed else None)
    except (RuntimeError, ValueError) as e:  # e.g. accelerate's own refusal of FSDP on CPUs, in its words
        problem = engine_mismatch(os.environ, "MULTI_CPU" if cpu else "NO")
        if problem:
            raise RuntimeError(problem) from e
        raise
    fsdp_on_cpus(acc)
    deepspeed_from_config(acc, t)
    if acc.num_processes != asked:
        raise RuntimeError(f"the launcher started {asked} processes but they train as {acc.num_processes}: "
                           "they would each train their own model")
    problem = engine_mismatch(os.environ, acc.distributed_type.value)
    if problem:
        raise RuntimeError(problem)
    print(f"training: {acc.distributed_type.value}, process {acc.process_index} of {acc.num_processes} "
          f"on {acc.device}", flush=True)
    set_seed(int(t.get("seed", 0)), device_specific=False)
    if acc.is_main_process:
        OmegaConf.save(cfg, os.path.join(out, "config.yaml"))
    return acc, out


class LossLog:
    """Losses to the console (progress bar), TensorBoard (through accelerate) and a CSV file."""

    def __init__(self, accelerator, out_dir: str, project: str, config: DictConfig, resume_step: int = 0):
        self.acc = accelerator
        self.path = os.path.join(out_dir, "losses.csv")
        if accelerator.is_main_process:
            if resume_step and os.path.exists(self.path):
                self._truncate(resume_step)
            if accelerator.log_with:
                accelerator.init_trackers(project, config=_flat(config))

    def _truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (a killed run may have gone further)."""
        with open(self.path) as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step] if rows else []
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def log(self, step: int, values: dict) -> None:
        if not self.acc.is_main_process:
            return
        values = {k: float(v) for k, v in values.items()}
        if self.acc.log_with:
            self.acc.log(values, step=step)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", *values])
            w.writerow([step, *(f"{v:.6g}" for v in values.values())])


def _flat(cfg: DictConfig) -> dict:
    out = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                out[f"{prefix}{k}"] = v

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


# -- checkpoints -------------------------------------------------------------------------------------------
def checkpoint_dirs(out_dir: str) -> list[str]:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if re.fullmatch(r"checkpoint_\d+", d)
             and os.path.isfile(os.path.join(root, d, "trainer_state.json"))]
    return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d.split("_")[1]))]


def save_checkpoint(accelerator, out_dir: str, step: int, keep: int = 2) -> None:
    path = os.path.join(out_dir, "checkpoints", f"checkpoint_{step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        # Written last: a checkpoint without it (killed mid-save) is never resumed from.
        write_json(os.path.join(path, "trainer_state.json"), {"step": step, "time": time.time()})
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator, out_dir: str) -> int:
    """Load the latest complete checkpoint; returns its step (0 when there is none)."""
    dirs = checkpoint_dirs(out_dir)
    if not dirs:
        accelerator.print("no checkpoint to resume from; starting at step 0")
        return 0
    accelerator.load_state(dirs[-1])
    with open(os.path.join(dirs[-1], "trainer_state.json")) as f:
        step = int(json.load(f)["step"])
    accelerator.print(f"resumed from {dirs[-1]} (step {step})")
    return step


# -- data --------------------------------------------------------------------------------------------------
def batches(loader, start_step: int, accumulation: int) -> Iterator:
    """An endless stream of batches that, after a resume at ``start_step``, continues exactly where the
    interrupted run was: the data order is a function of (seed, epoch) only, so we skip what was used."""
    skip = start_step * accumulation
    epoch = 0
    while True:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if n == 0:
            raise RuntimeError("the training data is empty (or every record was skipped)")
        epoch += 1


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(params, t: DictConfig):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.get("weight_decay", 0.0)),
                            betas=tuple(t.get("betas", (0.9, 0.999))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(t.get("warmup_steps", 0)), int(t.max_steps)))
    return opt, sched


def blocks_to_wrap(model: torch.nn.Module) -> list[str]:
    """The block classes FSDP shards one by one in ``model``: what its parts keep whole (their
    ``_no_split_modules``: Llama decoder layers, the UNet's and VAE's blocks, the ViT's blocks), as far as the
    model has them. accelerate reads ``_no_split_modules`` of the prepared module alone, and our stages prepare
    wrappers around these parts."""
    names: list[str] = []
    for part in model.modules():
        names += [n for n in getattr(part, "_no_split_modules", None) or [] if n not in names]
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in names if n in present]


SHARDING_ENGINES = ("FSDP", "DEEPSPEED")


def weightless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s structure with its parameters on the meta device (no memory; buffers shared): where the full
    weights gathered from a sharded run are put for the export. Sharding changes the modules themselves (FSDP 2
    swaps their class and parameters), so the copy is taken before."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def prepare_training(accelerator, model: torch.nn.Module, t: DictConfig):
    """The optimizer and schedule for ``model``'s trainable parameters, all three prepared by accelerate, and
    (under FSDP or DeepSpeed, which shard the model) its ``weightless_copy`` for ``unwrap_trained``; None
    otherwise. Under FSDP each stage wraps the blocks of what it trains, unless the launch config names its own
    (every sharded part must then run inside the model's forward, where FSDP gathers its weights)."""
    lower = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if lower and str(getattr(accelerator, "mixed_precision", "no")) == "no":
        raise ValueError(f"the model is loaded in {', '.join(sorted(map(str, lower)))} (model.dtype): train it with "
                         "mixed precision (train.mixed_precision: bf16, or the launch config's)")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # the optimizer keeps and steps fp32 weights
            p.data = p.data.float()
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and lower and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("FSDP 1 flattens each block's weights into one tensor of one dtype, and this model mixes "
                         "frozen weights in model.dtype with trained fp32 ones: set fsdp_version: 2 in the launch "
                         "config, use DeepSpeed, or load in fp32")
    if plugin is not None and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = blocks_to_wrap(model)
    if accelerator.distributed_type.value == "DEEPSPEED":
        allocate_weightless(model)
    shell = weightless_copy(model) if accelerator.distributed_type.value in SHARDING_ENGINES else None
    optimizer, scheduler = make_optimizer(model.parameters(), t)
    return (*accelerator.prepare(model, optimizer, scheduler), shell)


def image_loader(cfg: DictConfig, pipe: SeedStoryPipeline, accelerator, resolution: int, random_crop: bool = False):
    """Single pictures of ``data.train_jsonl`` at ``resolution`` (stages 0, 0b and 1), each process its share."""
    from torch.utils.data import DataLoader

    from seedstory.data.datasets import ImageDataset, collate_images

    d, t = cfg.data, cfg.train
    dataset = ImageDataset(resolve_path(d.train_jsonl), resolve_path(d.image_root), pipe.image_processor, resolution,
                           random_crop=random_crop, seed=int(t.get("seed", 0)), rank=accelerator.process_index,
                           world_size=accelerator.num_processes)
    return DataLoader(dataset, batch_size=int(t.batch_size), num_workers=int(d.get("num_workers", 0)),
                      collate_fn=collate_images)


# -- models ------------------------------------------------------------------------------------------------
def load_dtype(cfg: DictConfig) -> str:
    """``model.dtype``: what the stage loads the model in (default fp32). bf16 halves every process's copy of
    the frozen parts (a release-size LLM, ViT and UNet: about 50 GiB per process in fp32); the parts it trains
    are cast back to fp32 for the optimizer, and it needs mixed precision to run the two together."""
    name = str(cfg.model.get("dtype", "fp32"))
    if DTYPES.get(name) not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"model.dtype must be fp32, bf16 or fp16, not {name!r}")
    return name


def frozen_features(vit: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen visual tokenizer's features of ``pixels``, in fp32 whatever dtype it was loaded in."""
    with torch.no_grad():
        return vit(pixels.to(vit.device, vit.dtype)).float()


def load_pipeline(cfg: DictConfig, weightless: Sequence[str] = ()) -> SeedStoryPipeline:
    """The starting point of a stage: ``model.pretrained`` (a folder in our format, e.g. the previous
    stage's ``final/``) or ``model.preset`` (random init or the release), on the CPU in ``model.dtype`` (fp32
    unless set) — accelerate moves what it trains. ``model.agent_from`` / ``model.detokenizer_from`` (other saved
    folders) take that component from there: the demo build's stage 2 joins stage 0b's visual tokenizer with
    stage 2t's agent, and stage 3 stage 1's de-tokenizer with stage 2's agent. ``weightless``: components loaded
    without their weights (``SeedStoryPipeline.from_pretrained``)."""
    m = cfg.model
    name = load_dtype(cfg)
    dtype = DTYPES[name]
    lent = [part for part in ("agent", "detokenizer") if m.get(f"{part}_from")]
    first = sorted(set(weightless) | set(lent))  # (what comes from elsewhere is not read here)
    if m.get("pretrained"):
        pipe = SeedStoryPipeline.from_pretrained(resolve_path(m.pretrained), device="cpu", torch_dtype=dtype,
                                                 weightless=first)
    else:
        overrides = ["runtime.device=cpu", f"runtime.dtype={name}", *list(m.get("overrides", []) or [])]
        pipe = SeedStoryPipeline.from_preset(m.preset, overrides, weightless=first)
    for part in lent:
        source = resolve_path(m.get(f"{part}_from"))
        # (only ``part`` is taken from there: the rest is not read)
        other = SeedStoryPipeline.from_pretrained(source, device="cpu", torch_dtype=dtype,
                                                  weightless=[p for p in COMPONENTS if p != part or p in weightless])
        if part == "agent" and other.tokenizer.get_vocab() != pipe.tokenizer.get_vocab():
            raise ValueError(f"model.agent_from: {source} was trained with another text tokenizer")
        setattr(pipe, part, getattr(other, part))
        pipe.check_sizes()
    return pipe


def unwrap_trained(accelerator, model: torch.nn.Module, shell: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The trained module with its full weights, for the export. When DeepSpeed or FSDP shard it across
    processes, ``get_state_dict`` gathers the weights to the main process (the one that exports), which puts them
    into ``shell`` (prepare_training's weightless copy); the other processes get the shell without weights.
    Every process must call it (the gathering is collective)."""
    state = accelerator.get_state_dict(model)
    if accelerator.distributed_type.value not in SHARDING_ENGINES:
        return accelerator.unwrap_model(model)
    if state:
        shell.load_state_dict(state, assign=True)
    return shell


def export(accelerator, pipe: SeedStoryPipeline, out_dir: str) -> Optional[str]:
    """Write the trained model in the from_pretrained format (``out_dir/final``)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    path = write_dir(os.path.join(out_dir, "final"), pipe.save_pretrained)  # an interrupted export keeps the last one
    accelerator.print(f"exported {path}")
    return path


def count_parameters(module: torch.nn.Module) -> str:
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return f"{train / 1e6:.2f} M trainable of {total / 1e6:.2f} M"


class WeightAverage:
    """An exponential moving average of the trained weights (``train.ema_decay``, as diffusers' training
    scripts' ``--use_ema``): diffusion models often sample better from averaged weights than from the last step's.
    The average warms up (decay ``1 - (1 + step) ** -2/3``, capped at ``ema_decay``) so a short run is not
    dominated by its random start. Checkpointed with the run; ``train_loop`` leaves the average in the model."""

    def __init__(self, accelerator, model: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMAModel(self.params, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
        accelerator.register_for_checkpointing(self.ema)

    def step(self) -> None:
        self.ema.step(self.params)

    def copy_to_model(self) -> None:
        self.ema.copy_to(self.params)


def make_weight_average(accelerator, model: torch.nn.Module, t: DictConfig) -> Optional[WeightAverage]:
    """``WeightAverage`` when ``train.ema_decay`` > 0 (call after ``accelerator.prepare``, before resume)."""
    decay = float(t.get("ema_decay") or 0.0)
    if decay > 0 and shards_weights(accelerator):
        # each process holds a shard of every weight: the average would be kept and checkpointed per shard
        raise ValueError("train.ema_decay is not supported under FSDP or DeepSpeed ZeRO-3 (the weights are sharded): "
                         "set train.ema_decay=0, or train with DDP or ZeRO-2")
    return WeightAverage(accelerator, model, decay) if decay > 0 else None


def global_mean(accelerator, loss: torch.Tensor, count) -> torch.Tensor:
    """``loss``, a mean over this process's ``count`` items (label tokens, target pictures), rescaled so that the
    processes' average, which is what data parallelism makes of the gradients and what is logged, is the mean
    over all their items: the loss one process would compute on the whole global batch."""
    if accelerator.num_processes == 1:
        return loss
    count = torch.as_tensor(count, dtype=torch.float32, device=loss.device)
    total = accelerator.reduce(count.clone(), "sum")
    return loss * count * accelerator.num_processes / total.clamp(min=1)


def train_loop(accelerator, model, optimizer, scheduler, loader, cfg: DictConfig, out_dir: str, name: str,
               start_step: int, compute_losses, average: Optional[WeightAverage] = None) -> None:
    """The loop every stage runs: ``compute_losses(batch) -> {"loss": tensor, ...}`` (the first value is
    optimized; all are logged), gradient accumulation, clipping, LR schedule, weight average, logging,
    checkpoints. With a weight ``average`` the model holds the averaged weights when the loop returns (the
    checkpoints keep the last step's, so a resumed run goes on from those)."""
    t = cfg.train
    log = LossLog(accelerator, out_dir, name, cfg, start_step)
    max_steps, every = int(t.max_steps), int(t.get("checkpoint_every", 100))
    # stop_after: end early at that step (a checkpoint is written), e.g. to split a run over time slots.
    stop_after = int(t.get("stop_after") or max_steps)
    bar = tqdm(total=max_steps, initial=start_step, desc=name, disable=not accelerator.is_main_process)
    stream = batches(loader, start_step, accelerator.gradient_accumulation_steps)
    step, sums, n = start_step, {}, 0
    model.train()
    while step < max_steps:
        batch = next(stream)
        with accelerator.accumulate(model):
            losses = compute_losses(batch)
            accelerator.backward(next(iter(losses.values())))
            if accelerator.sync_gradients and t.get("max_grad_norm"):
                accelerator.clip_grad_norm_(model.parameters(), float(t.max_grad_norm))
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(accelerator.reduce(v.detach(), "mean"))
        n += 1
        if accelerator.sync_gradients:
            step += 1
            if average is not None:
                average.step()
            values = {k: v / n for k, v in sums.items()}
            log.log(step, {**values, "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
            sums, n = {}, 0
            if step % every == 0 or step in (max_steps, stop_after):
                save_checkpoint(accelerator, out_dir, step, keep=int(t.get("keep_checkpoints", 2)))
            if step >= stop_after:
                break
    bar.close()
    if average is not None:
        average.copy_to_model()
    peak = peak_host_memory()
    if peak is not None:
        print(f"process {accelerator.process_index}: peak host memory {peak / 2**30:.2f} GiB", flush=True)


def peak_host_memory() -> Optional[int]:
    """This process's peak resident memory in bytes (Linux's VmHWM), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
