"""Host memory of each training process under FSDP 2, side by side: every process reading the weights of what
the stage trains (``--fsdp_cpu_ram_efficient_loading false``) against only the first one reading them while the
others load its structure and receive their shards from it (``configs/accelerate/fsdp.yaml``). Either way the
processes other than the first skip the weights of what the stage does not use (stage 2: the de-tokenizer).
Stage 2 as the release trains it (``configs/train/seed-story-stage2-lora.yaml``: LoRA, model.dtype bf16) under two
CPU processes, up to its first step (loaded, sharded, exported: a step adds the same activations either way), the
modes interleaved, ``--rounds`` rounds; each process's peak resident memory (the training log's "peak host
memory"), min and median.

    python bench/bench_loading.py                  # the release's widths at reduced depth (bf16), ~5 min
    python bench/bench_loading.py --model DIR      # any saved model folder (--preset tiny: a quick check)

The default model is seed-story-random (the 4096-wide LLM, ViT-bigG's width, the SDXL UNet's channels) with
``--layers`` LLM layers, saved once in bf16.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROXY = ["visual_tokenizer.layers=2", "detokenizer.unet.transformer_layers_per_block=[1,1,1]",
         "detokenizer.unet.layers_per_block=1", "runtime.dtype=bf16", "runtime.device=cpu"]
MODES = {"every process reads the agent": "false", "only process 0 reads it": "true"}


def build(out: str, preset: str, layers: int) -> None:
    from seedstory.pipeline import SeedStoryPipeline

    overrides = [*PROXY, f"agent.llm.num_hidden_layers={layers}"] if preset == "seed-story-random" else \
        ["runtime.dtype=bf16", "runtime.device=cpu"]
    SeedStoryPipeline.from_preset(preset, overrides).save_pretrained(out)


def train_once(model: str, world: str, out: str, efficient: str, port: int) -> dict[int, float]:
    """Stage 2 under two FSDP processes, up to its first step; each process's peak host memory in GiB."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"), "--num_processes", "2",
           "--mixed_precision", "bf16", "--fsdp_cpu_ram_efficient_loading", efficient, "--main_process_port", str(port),
           "-m", "training.stage2_agent",
           "--config", os.path.join(ROOT, "configs", "train", "seed-story-stage2-lora.yaml"),
           f"output_dir={out}", "log_with=[]", f"model.pretrained={model}", f"data.train_jsonl={world}/train.jsonl",
           f"data.image_root={world}/images", "data.num_workers=0", "data.shuffle_buffer=0", "train.max_steps=0",
           "train.batch_size=1", "train.warmup_steps=0", "train.checkpoint_every=100"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {int(i): float(g) for i, g in re.findall(r"process (\d+): peak host memory ([\d.]+) GiB", done.stdout)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a saved model folder (default: --preset's model, saved once in bf16)")
    p.add_argument("--preset", default="seed-story-random", help="a random preset (default: the release's sizes, "
                                                                 "at --layers LLM layers and 2 ViT layers)")
    p.add_argument("--layers", type=int, default=4, help="LLM layers of seed-story-random (the release: 32)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:  # (a process of its own, so that the launches do not start from a parent holding a model)
        build(args.build, args.preset, args.layers)
        return
    from seedstory.data.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "model")
            print(f"saving {args.preset} (bf16) ...", flush=True)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--build", model, "--preset", args.preset,
                                   "--layers", str(args.layers)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
        world = os.path.join(tmp, "world")
        write_dataset(world, stories=4, frames=4, size=64, seed=0, workers=1, progress=False)
        seen = {name: {0: [], 1: []} for name in MODES}
        for r in range(args.rounds):
            for i, (name, efficient) in enumerate(MODES.items()):
                for rank, gib in train_once(model, world, os.path.join(tmp, f"run{r}{i}"), efficient,
                                            29700 + 2 * r + i).items():
                    seen[name][rank].append(gib)
    print(f"{'stage 2, 2 FSDP processes':<32} {'process 0 (min / median)':>26} {'process 1 (min / median)':>26}")
    for name, ranks in seen.items():
        cells = [f"{min(v):.2f} / {statistics.median(v):.2f} GiB" for v in ranks.values()]
        print(f"{name:<32} {cells[0]:>26} {cells[1]:>26}")
    whole, efficient = (statistics.median(seen[name][1]) for name in MODES)
    print(f"process 1, whole / structure only (median): {whole / efficient:.2f}x")


if __name__ == "__main__":
    main()
