"""Every command in the README's code blocks, run as written in README order, in a folder laid out as a clone.

Where the README's own line needs what a test cannot have (the release weights, a GPU, an API key, two hours),
``INSTEAD`` names the nearest line that runs, or why none does and which test covers it. A command fails the test
on an exit status other than the expected one, a traceback, or a warning nobody asked for; a README command added
without running here, or an ``INSTEAD`` entry whose command left the README, fails it too."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from test_readme import ROOT, read

SMALL_DATA = "python -m seedstory.data.synthetic --out data/world --stories 12 --frames 6 --size 128 --seed 0"
# README command (comments and line continuations removed) -> (what runs instead, or None; why)
INSTEAD = {
    "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu && pip install -r "
    "requirements.txt && python app.py": (None, "the install: CI runs it (.ci/run); test_readme checks the line; "
                                                "test_app_api serves the app"),
    "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu && pip install -r "
    "requirements-dev.txt && pytest": (None, "this very test run"),
    "python -m training.build_demo": ("python -m training.build_demo --help",
                                      "about 2 h; test_build_demo builds a small model through the same command"),
    "python -m seedstory.data.synthetic --out data/world --stories 2000 --frames 30 --size 128 --seed 0":
        (SMALL_DATA, "12 stories of 6 frames: the commands below read them"),
    "python -m seedstory.data validate story.jsonl --images ROOT [--no-images] [--json]":
        ("python -m seedstory.data validate data/world/train.jsonl --images data/world/images --json",
         "the README's placeholders filled in"),
    "python -m seedstory.data chunk story.jsonl --out story_10.jsonl [--window 10] [--stride N] [--min-frames N]":
        ("python -m seedstory.data chunk data/world/train.jsonl --out story_3.jsonl --window 3", "placeholders"),
    "python -m seedstory.data stats story.jsonl [--images ROOT] [--json]":
        ("python -m seedstory.data stats data/world/train.jsonl --images data/world/images --json", "placeholders"),
    "accelerate launch --config_file configs/accelerate/single_gpu.yaml -m training.stage2_agent --config "
    "configs/train/seed-story-stage2-lora.yaml": (None, "a GPU and the release weights"),
    "accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m training.stage2_agent --config ...":
        (None, "8 GPUs"),
    "accelerate launch --config_file configs/accelerate/fsdp.yaml -m training.stage2_agent --config ...":
        (None, "8 GPUs"),
    "accelerate launch --config_file configs/accelerate/multi_node.yaml --machine_rank $RANK --main_process_ip "
    "$MAIN_IP -m training.stage2_agent --config configs/train/seed-story-stage2-lora.yaml": (None, "several nodes"),
    "python -m seedstory.eval generate --val data/world/val.jsonl --images data/world/images --out runs/eval/ours "
    "--preset seed-story-george --frames 24":
        ("python -m seedstory.eval generate --val data/world/val.jsonl --images data/world/images --out runs/eval/ours "
         "--preset tiny --frames 2", "the release weights: the tiny preset writes the same files"),
    "export OPENAI_API_KEY=...": (None, "a key"),
    "python -m seedstory.eval judge --stories runs/eval/ours --base-url https://api.openai.com/v1 --model gpt-4o":
        (None, "a chat endpoint: test_eval_judge runs the judge against a local stand-in"),
    "python -m seedstory.eval judge --pairwise runs/eval/ours runs/eval/other --base-url http://127.0.0.1:8000/v1 "
    "--model my-vlm": (None, "a chat endpoint: test_eval_judge"),
    "python bench/bench_context.py --preset bench-small":
        ("python bench/bench_context.py --preset bench-small --frames 3 --targets 2 --repeats 1 --op-frame 2",
         "minutes: the same measurement at frame 2 only"),
    "HF_TOKEN=hf_... python -m seedstory download --preset seed-story-george [--to DIR]":
        (None, "the Hub and 40 GB: test_download runs the same command against a local stand-in Hub"),
    "python bench/bench_decode.py": ("python bench/bench_decode.py --preset tiny --contexts 20,60 --tokens 4 --repeats 1",
                                     "the same measurement on the tiny preset"),
    "python bench/bench_decode.py --preset demo --contexts 200 --candidates 16 --tokens 12":
        ("python bench/bench_decode.py --preset tiny --contexts 20 --candidates 3 --tokens 4 --repeats 1",
         "the same measurement on the tiny preset"),
    "python bench/bench_pipeline.py --preset bench-small --set generation.num_inference_steps=25":
        ("python bench/bench_pipeline.py --preset tiny --frames 2 --repeats 1", "minutes: two frames of the tiny preset"),
    "python bench/bench_fullsize.py --proxy": ("python bench/bench_fullsize.py --preset tiny --options bf16 --frames 2 "
                                               "--context-frames 2", "minutes: the same script on the tiny preset"),
    "python bench/bench_loading.py": ("python bench/bench_loading.py --preset tiny --rounds 1",
                                      "the release's widths take ~6 GiB a process; the tiny model, the same path"),
    "python bench/bench_demo.py": ("python bench/bench_demo.py --text-only --stories 1 --frames 2",
                                   "half an hour: one opening, text only"),
}
# Commands that end with a status other than 0 on purpose, and what they must say.
EXPECTED = {
    "python -m seedstory doctor --preset seed-story-george": (1, "cannot load"),
    "python -m seedstory extract-vit --qwen-vl-chat /path/to/Qwen-VL-Chat --out pretrained/visual_tokenizer/":
        (2, "not found"),
}
PYTHON_INSTEAD = {"api_name=": (None, "a running app: test_app_api drives every endpoint through gradio_client")}
NOISE = re.compile(r"Traceback|warning|deprecat", re.I)


def readme_commands():
    """(kind, command) in README order: kind "bash" (one command per line) or "python" (a whole snippet)."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", read("README.md"), re.S):
        if lang == "python":
            found.append(("python", body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    found.append(("bash", " ".join(shlex.quote(w) if re.search(r"[\s\"']", w) else w
                                                    for w in words)))
    return found


def test_every_instead_entry_is_still_a_readme_command():
    bash = {cmd for kind, cmd in readme_commands() if kind == "bash"}
    assert set(INSTEAD) - bash == set() and set(EXPECTED) <= bash


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder laid out as a fresh clone: the repository's code and assets, nothing made yet."""
    work = tmp_path_factory.mktemp("clone")
    for name in ("assets", "configs", "bench", "training", "seedstory", "app.py"):
        os.symlink(os.path.join(ROOT, name), work / name)
    return work


def run(cmd, cwd, python_file=None):
    env = dict(os.environ, PYTHONPATH=ROOT, SEEDSTORY_HOME=str(cwd), OMP_WAIT_POLICY="PASSIVE",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # accelerate, torchrun
    env.pop("SEEDSTORY_VERBOSE", None)
    argv = [sys.executable, python_file] if python_file else ["bash", "-c", cmd.replace("python ", f"{sys.executable} ", 1)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_every_readme_command_runs_quietly(clone):
    ran = []
    for i, (kind, cmd) in enumerate(readme_commands()):
        if kind == "python":
            skip = next((why for key, (_, why) in PYTHON_INSTEAD.items() if key in cmd), None)
            if skip:
                continue
            path = clone / f"snippet_{i}.py"
            path.write_text(cmd)
            done = run(None, clone, str(path))
            status, must_say = 0, ""
        else:
            if cmd in INSTEAD and INSTEAD[cmd][0] is None:
                continue
            status, must_say = EXPECTED.get(cmd, (0, ""))
            done = run(INSTEAD.get(cmd, (cmd,))[0], clone)
        said = done.stdout + done.stderr
        shown = f"{cmd[:200]}\n--- exit {done.returncode}\n{said[-3000:]}"
        assert done.returncode == status, shown
        assert must_say in said, shown
        noise = [line for line in re.split(r"[\r\n]", done.stderr) if NOISE.search(line)]
        assert not noise, shown
        ran.append(cmd)
    assert len(ran) >= 20
    assert (clone / "outputs" / "beach" / "story.json").is_file() and (clone / "outputs" / "fox.zip").is_file()
