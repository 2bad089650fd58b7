"""Rebuild the shipped demo model from scratch: synthetic data, text tokenizer, stages 0-3, export.

    python -m training.build_demo                       # everything, on the CPU (about 2 h on 2 cores)
    python -m training.build_demo --launcher "accelerate launch --config_file configs/accelerate/single_gpu.yaml"

Every step is skipped when its output exists and resumed from its latest checkpoint when it was
interrupted, so re-running the command after a crash (or ``kill -9``) continues the build. The configs
are the committed ``configs/train/demo/*.yaml``; ``--set stage1.train.max_steps=100`` style overrides
are for quick trials (a build with overrides should go to another ``--work`` folder).
The result is written to ``assets/demo-model`` (fp16 safetensors, loaded as fp32 on a CPU) and the
``demo`` preset (``configs/presets/demo.yaml``) points there.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

from seedstory.atomic import write_dir
from seedstory.config import REPO_ROOT, resolve_path

# (stage, module, the stage whose export it starts from, the stage whose de-tokenizer it takes).
# Stage 2 trains the agent on the stage-0b visual tokenizer's features and never touches the de-tokenizer,
# so it does not wait for stage 1; stage 3 joins stage 2's agent with stage 1's de-tokenizer.
STAGES = [
    ("stage0", "training.stage0_vae", None, None),
    ("stage0v", "training.stage0_vit", "stage0", None),
    ("stage1", "training.stage1_detokenizer", "stage0v", None),
    ("stage2", "training.stage2_agent", "stage0v", None),
    ("stage3", "training.stage3_adapt", "stage2", "stage1"),
]
CONFIG_DIR = "configs/train/demo"


def log(msg: str) -> None:
    print(f"[build_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# glibc hands every large freed block back to the kernel and maps it afresh on the next step, so a CPU stage
# spends ~15% of its time in page faults; keeping those blocks in the heap made a demo stage-1 step 7% faster
# (2.42 vs 2.57-2.69 s on 2 cores, same losses). Other allocators ignore these; the user's own settings win.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000",
              "MALLOC_TOP_PAD_": "268435456"}


def run(cmd: list[str]) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, env={**MALLOC_ENV, **os.environ})


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/world", help="synthetic data folder (made if missing)")
    p.add_argument("--stories", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/demo", help="run folders of the stages")
    p.add_argument("--out", default="assets/demo-model", help="where the finished model goes")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m",
                   help="how a stage module is started (default: this python; or 'accelerate launch ... -m')")
    p.add_argument("--set", nargs="*", default=[], metavar="STAGE.KEY=VALUE",
                   help="config overrides for one stage, e.g. stage1.train.max_steps=100")
    args = p.parse_args(argv)
    t0 = time.time()
    data, work = resolve_path(args.data), resolve_path(args.work)
    timings = {}

    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        start = time.time()
        run([sys.executable, "-m", "seedstory.data.synthetic", "--out", data, "--stories", str(args.stories),
             "--frames", "30", "--size", "128", "--seed", str(args.seed), "--no-progress"])
        timings["data"] = time.time() - start
    tokenizer = os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        start = time.time()
        run([sys.executable, "-m", "training.text_tokenizer", "--jsonl", os.path.join(data, "train.jsonl"),
             "--vocab-size", "512", "--num-img-tokens", "16", "--out", tokenizer])
        timings["tokenizer"] = time.time() - start

    def final(stage: str) -> str:
        return os.path.join(work, stage, "final")

    for name, module, base, detok in STAGES:
        out_dir = os.path.join(work, name)
        if os.path.isfile(os.path.join(final(name), "seedstory.json")):
            log(f"{name}: done ({final(name)})")
            continue
        overrides = [f"output_dir={out_dir}", f"data.train_jsonl={os.path.join(data, 'train.jsonl')}",
                     f"data.image_root={os.path.join(data, 'images')}"]
        if base is None:
            overrides.append(f"model.overrides=[tokenizer.path={tokenizer}]")
        else:
            overrides.append(f"model.pretrained={final(base)}")
        if detok is not None:
            overrides.append(f"model.detokenizer_from={final(detok)}")
        overrides += [o.split(".", 1)[1] for o in args.set if o.startswith(name + ".")]
        resume = ["--resume"] if os.path.isdir(os.path.join(out_dir, "checkpoints")) else []
        start = time.time()
        run(shlex.split(args.launcher) + [module, "--config", os.path.join(CONFIG_DIR, f"{name}.yaml"), *resume,
                                          *overrides])
        timings[name] = time.time() - start

    out = resolve_path(args.out)
    publish(final(STAGES[-1][0]), out)
    timings["total"] = time.time() - t0
    with open(os.path.join(work, "build_timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    log(f"demo model written to {out}; timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}")
    return out


def publish(final: str, out: str) -> None:
    """Copy the last stage's export to ``out`` in fp16 (half the size; the preset loads it as fp32)."""
    import torch

    from seedstory.pipeline import SeedStoryPipeline

    pipe = SeedStoryPipeline.from_pretrained(final, device="cpu", torch_dtype=torch.float32)
    pipe.to("cpu", torch.float16)

    def save(path: str) -> None:
        pipe.save_pretrained(path)
        # diffusers records where each part was loaded from: a path on the build machine, not for shipping.
        for config in glob.glob(os.path.join(path, "**", "config.json"), recursive=True):
            with open(config) as f:
                data = json.load(f)
            if data.pop("_name_or_path", None) is not None:
                with open(config, "w") as f:
                    json.dump(data, f, indent=2, sort_keys=True)
                    f.write("\n")

    write_dir(out, save)


if __name__ == "__main__":
    main()
