"""Rebuild the shipped demo model from scratch: synthetic data, text tokenizer, stages 0-3, export.

    python -m training.build_demo                       # everything, on the CPU (about 2 h on 2 cores)
    python -m training.build_demo --launcher "accelerate launch --config_file configs/accelerate/single_gpu.yaml"
    python -m training.build_demo --until stage0v       # part of the build (a time slot); run again to go on

Stages that do not wait for each other run at the same time (``--jobs``, 2 by default): stage 2t (the
agent's text) beside stages 0 and 0b (the pictures' VAE and visual tokenizer), then stage 1 (the
de-tokenizer) beside stage 2 (the agent), then stage 2c (the agent again, on its own stories corrected by the
world's rules) and stage 3. Stages side by side write their output to
``<work>/<stage>.log``, and the build prints each one's progress every minute.
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
from typing import Optional

from seedstory.atomic import write_dir
from seedstory.config import REPO_ROOT, resolve_path

# (stage, module, the stage whose export it starts from (None: the demo's random init), the stages whose
# exports lend it a component). Stage 2t teaches the agent's LLM the stories' text alone (the release starts
# from an LLM that knows its language): it needs no picture, so it starts from the random init and runs beside
# stages 0 and 0b. Stage 2 then trains stage 2t's agent on stage 0b's visual tokenizer's features; neither
# touches the de-tokenizer, so they do not wait for stage 1 (they run beside it). Stage 2c goes on training stage
# 2's agent on its own stories, corrected by the world's rules; stage 3 joins that agent with stage 1's
# de-tokenizer. Stage 0b starts from stage 0's export although it trains only the visual tokenizer: loading a
# saved model draws other random numbers than making one, so its read-out head would start elsewhere.
STAGES = [
    ("stage0", "training.stage0_vae", None, {}),
    ("stage2t", "training.stage2_agent", None, {}),
    ("stage0v", "training.stage0_vit", "stage0", {}),
    ("stage1", "training.stage1_detokenizer", "stage0v", {}),
    ("stage2", "training.stage2_agent", "stage0v", {"agent": "stage2t"}),
    ("stage2c", "training.stage2c_corrected", "stage2", {}),
    ("stage3", "training.stage3_adapt", "stage2c", {"detokenizer": "stage1"}),
]
CONFIG_DIR = "configs/train/demo"


def log(msg: str) -> None:
    print(f"[build_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def needs(stage: tuple) -> set[str]:
    """The stages whose exports this one starts from or takes a component from."""
    base, lent = stage[2], stage[3]
    return ({base} if base is not None else set()) | set(lent.values())


def upstream(name: str) -> set[str]:
    """``name`` and every stage it is built on."""
    stage = next(s for s in STAGES if s[0] == name)
    return {name}.union(*(upstream(base) for base in needs(stage)))


# glibc hands every large freed block back to the kernel and maps it afresh on the next step, so a CPU stage
# spends much of its time in page faults; these keep the blocks in the heap (docs/experiments.md). Other
# allocators ignore them; the user's own settings win.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000",
              "MALLOC_TOP_PAD_": "268435456"}


# Two CPU stages at once: OpenMP threads that spin while they wait for work take the other stage's core;
# passive ones sleep, so each stage keeps its thread count (the same weights, bit for bit) and takes both
# cores once the other is done (docs/experiments.md).
SHARED_CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def stage_env(shared_cpu: bool = False) -> dict:
    return {**MALLOC_ENV, **(SHARED_CPU_ENV if shared_cpu else {}), **os.environ}


def run(cmd: list[str]) -> None:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, env=stage_env())


def last_progress(path: str) -> str:
    """The last line (or tqdm update) a stage wrote to its log."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1][-160:] if lines else ""


def run_stages(commands: dict[str, list[str]], needs_of: dict[str, set[str]], jobs: int, work: str,
               timings: dict, report_every: float = 60.0) -> None:
    """Run the stages in ``commands`` (in order, a stage once those it needs have finished), up to ``jobs`` at
    once. One stage alone writes to the terminal; stages side by side write to ``<work>/<stage>.log``."""
    os.makedirs(work, exist_ok=True)
    pending, running = list(commands), {}  # name -> (process, started, log path or None, log file)
    last_report = time.time()
    try:
        while pending or running:
            ready = [n for n in pending if not (needs_of[n] & (set(pending) | set(running)))]
            launch = ready[:max(0, jobs - len(running))]
            together = len(running) + len(launch) > 1
            for name in launch:
                pending.remove(name)
                cmd = commands[name]
                log_path = os.path.join(work, f"{name}.log") if together else None
                log("$ " + " ".join(shlex.quote(c) for c in cmd) + (f"  > {log_path}" if log_path else ""))
                out = open(log_path, "a") if log_path else None
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=stage_env(shared_cpu=together), stdout=out,
                                        stderr=subprocess.STDOUT if out else None)
                running[name] = (proc, time.time(), log_path, out)
            if not running:
                raise RuntimeError(f"stages {pending} wait for stages that are not built")
            time.sleep(0.2)
            for name, (proc, started, log_path, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if out:
                    out.close()
                if proc.returncode != 0:
                    where = f"; its output: {log_path}\n  {last_progress(log_path)}" if log_path else ""
                    raise RuntimeError(f"{name} failed (exit status {proc.returncode}){where}")
                timings[name] = time.time() - started
                log(f"{name}: finished in {timings[name] / 60:.1f} min")
            if time.time() - last_report >= report_every:
                last_report = time.time()
                for name, (_, _, log_path, _) in running.items():
                    if log_path:
                        log(f"{name}: {last_progress(log_path)}")
    finally:  # a failure (or Ctrl-C) stops the others; re-running the build resumes them from their checkpoints
        for proc, _, _, out in running.values():
            proc.terminate()
            proc.wait()
            if out:
                out.close()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/world", help="synthetic data folder (made if missing)")
    p.add_argument("--stories", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/demo", help="run folders of the stages")
    p.add_argument("--out", default="assets/demo-model",
                   help="where the finished model goes (default: assets/demo-model, replacing the shipped model; "
                        "its model card is kept)")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m",
                   help="how a stage module is started (default: this python; or 'accelerate launch ... -m')")
    p.add_argument("--jobs", type=int, default=2,
                   help="stages run at the same time when they do not need each other (1: one after the other)")
    p.add_argument("--until", choices=[s[0] for s in STAGES], metavar="STAGE",
                   help="build this stage and those it needs, then stop (a build split over time slots; the next run "
                        "without it goes on from there): " + ", ".join(s[0] for s in STAGES))
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

    commands = {}
    wanted = upstream(args.until) if args.until else {s[0] for s in STAGES}
    for name, module, base, lent in STAGES:
        out_dir = os.path.join(work, name)
        if name not in wanted:
            continue
        if os.path.isfile(os.path.join(final(name), "seedstory.json")):
            log(f"{name}: done ({final(name)})")
            continue
        overrides = [f"output_dir={out_dir}", f"data.train_jsonl={os.path.join(data, 'train.jsonl')}",
                     f"data.image_root={os.path.join(data, 'images')}"]
        if base is None:
            overrides.append(f"model.overrides=[tokenizer.path={tokenizer}]")
        else:
            overrides.append(f"model.pretrained={final(base)}")
        overrides += [f"model.{part}_from={final(stage)}" for part, stage in lent.items()]
        overrides += [o.split(".", 1)[1] for o in args.set if o.startswith(name + ".")]
        resume = ["--resume"] if os.path.isdir(os.path.join(out_dir, "checkpoints")) else []
        commands[name] = shlex.split(args.launcher) + [module, "--config", os.path.join(CONFIG_DIR, f"{name}.yaml"),
                                                       *resume, *overrides]
    run_stages(commands, {s[0]: needs(s) & set(commands) for s in STAGES}, max(1, args.jobs), work, timings)
    if args.until:
        log(f"stopped after {args.until} ({final(args.until)}); run again without --until to go on")
        return final(args.until)

    out = resolve_path(args.out)
    publish(final(STAGES[-1][0]), out, data=data)
    timings["total"] = time.time() - t0
    with open(os.path.join(work, "build_timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    log(f"demo model written to {out}; timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}")
    return out


MODEL_CARD = "README.md"  # the model card: written by hand beside the weights, kept when they are replaced


def frames_of(jsonl: str, image_root: str, stories: int, per_story: int) -> list:
    """Up to ``per_story`` frames, evenly spread, from each of the first ``stories`` stories of a jsonl."""
    from PIL import Image

    images = []
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if len(images) >= stories * per_story:
                break
            rels = json.loads(line)["images"]
            for rel in rels[:: max(1, len(rels) // per_story)][:per_story]:
                with Image.open(os.path.join(image_root, rel)) as im:
                    images.append(im.convert("RGB"))
    return images


def fit_familiarity(pipe, data: str, stories: int = 500, per_story: int = 4):
    """Statistics of the training pictures' features (``seedstory.familiarity``), scaled by held-out ones, so the
    app can tell a visitor when an uploaded picture is unlike anything the model knows."""
    import torch

    from seedstory.familiarity import Familiarity

    def features(split: str, n: int) -> torch.Tensor:
        return torch.cat([pipe.encode_image(im) for im in frames_of(os.path.join(data, f"{split}.jsonl"),
                                                                    os.path.join(data, "images"), n, per_story)])

    return Familiarity.fit(features("train", stories), features("val", stories))


def publish(final: str, out: str, preset: str = "demo", data: Optional[str] = None) -> None:
    """Copy the last stage's export to ``out`` in fp16 (half the size; the preset loads it as fp32), with the
    ``preset``'s generation settings, so ``--preset <out>`` paints as ``--preset demo`` does, and the statistics
    of its training pictures (``data``: the synthetic world's folder) or those already in ``final``. A model card
    already in ``out`` is kept."""
    import torch

    from seedstory.config import GenerationSettings, load_preset
    from seedstory.pipeline import SeedStoryPipeline

    pipe = SeedStoryPipeline.from_pretrained(final, device="cpu", torch_dtype=torch.float32)
    if data is not None:
        pipe.familiarity = fit_familiarity(pipe, data)
    pipe.to("cpu", torch.float16)
    pipe.detokenizer.vae.half()  # stored in fp16 too; every loader reads the VAE back in fp32
    pipe.settings = GenerationSettings.from_config(load_preset(preset).generation)
    pipe.name = preset
    card_path = os.path.join(out, MODEL_CARD)
    card = open(card_path, encoding="utf-8").read() if os.path.isfile(card_path) else None

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
        if card is not None:
            with open(os.path.join(path, MODEL_CARD), "w", encoding="utf-8") as f:
                f.write(card)

    write_dir(out, save)


if __name__ == "__main__":
    main()
