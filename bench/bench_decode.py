"""Per-token decoding cost against the length of the context, side by side: the agent's ``decode_text`` (tokens
written in place into a ``KVWorkspace``) and the plain loop it replaced (each token through ``prefill`` on a
``KV`` value, which copies every layer's keys and values). Contexts of 259, 849 and 1857 tokens (a story's
context at frames 2, 10 and 25-50 of bench-small's sink mode), measured interleaved, ``--repeats`` rounds,
min and median ms per token, and each path's cost at the longest context over the shortest.
With ``--candidates K``, also the text of one frame with K caption candidates (``caption_candidates``): one
caption, K in one batch (``decode_texts``) and K one after another, side by side at the shortest context.

    python bench/bench_decode.py                      # bench-small on the CPU, one thread, about a minute
    python bench/bench_decode.py --preset demo --contexts 200 --candidates 16 --tokens 12   # the demo's captions
    python bench/bench_decode.py --device cuda --dtype bf16 --preset seed-story-random
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from seedstory.quiet import quiet_libraries  # noqa: E402
from seedstory.threads import passive_openmp  # noqa: E402

passive_openmp()
quiet_libraries()

import torch  # noqa: E402

from seedstory.models.agent import DecodingConfig  # noqa: E402
from seedstory.models.kv import kv_length  # noqa: E402
from seedstory.pipeline import SeedStoryPipeline  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def workspace_path(agent, logits, kv, n, image_ids, eos):
    """``decode_text`` as the engine calls it: exactly ``n`` tokens (EOS and ``<img>`` banned until then)."""
    cfg = DecodingConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n)
    agent.decode_text(logits, kv, image_ids, eos, cfg)


def value_path(agent, logits, kv, n, image_ids, eos):
    """The loop before the workspace: each token fed through ``prefill`` on an immutable ``KV`` value."""
    banned = torch.tensor(sorted(image_ids.all | {eos}), device=logits.device)
    for _ in range(n):
        scores = logits.clone()
        scores[banned] = float("-inf")
        logits, _, kv = agent.prefill(torch.tensor([int(scores.argmax())]), kv=kv)


PATHS = {"workspace (in place)": workspace_path, "value (copy per token)": value_path}


def candidates_paths(k: int) -> dict:
    """One frame's text with ``k`` caption candidates of ``n`` tokens each: one caption, k as one batch, k in turn."""
    def cfg(n):
        return DecodingConfig(do_sample=True, temperature=0.5, max_new_tokens=n, min_new_tokens=n)

    def one(agent, logits, kv, n, image_ids, eos):
        agent.decode_texts(logits, kv, image_ids, eos, cfg(n), 1, torch.Generator().manual_seed(0))

    def batch(agent, logits, kv, n, image_ids, eos):
        agent.decode_texts(logits, kv, image_ids, eos, cfg(n), k, torch.Generator().manual_seed(0))

    def in_turn(agent, logits, kv, n, image_ids, eos):
        generator = torch.Generator().manual_seed(0)
        for _ in range(k):
            agent.decode_texts(logits, kv, image_ids, eos, cfg(n), 1, generator)

    return {"one caption": one, f"{k} in one batch": batch, f"{k} in turn": in_turn}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--contexts", default="259,849,1857", help="context lengths in tokens")
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--candidates", type=int, default=0, metavar="K",
                   help="also time one frame's text with K caption candidates, in one batch and in turn")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"runtime.{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v]
    pipe = SeedStoryPipeline.from_preset(args.preset, overrides)
    agent, prompt = pipe.agent, pipe.prompt
    device = agent.device
    contexts = [int(c) for c in args.contexts.split(",")]
    vocab = len(pipe.tokenizer)
    gen = torch.Generator().manual_seed(0)
    banned = set(prompt.image_ids.all)
    states = {}
    with torch.no_grad():
        for n in contexts:
            ids = torch.randint(3, vocab, (n,), generator=gen)
            ids = torch.tensor([i if int(i) not in banned else 3 for i in ids])
            logits, _, kv = agent.prefill(ids, start_pos=0)
            states[n] = (logits, kv)
        times = {(name, n): [] for name in PATHS for n in contexts}
        for r in range(args.repeats):
            order = [(name, n) for n in contexts for name in PATHS]
            if r % 2:
                order.reverse()
            for name, n in order:
                logits, kv = states[n]
                _sync(device)
                t0 = time.perf_counter()
                PATHS[name](agent, logits, kv, args.tokens, prompt.image_ids, prompt.eos_id)
                _sync(device)
                times[(name, n)].append(1000 * (time.perf_counter() - t0) / args.tokens)

    print(f"per-token decode, ms ({args.preset} on {device}, {torch.get_num_threads()} thread(s), {args.tokens} tokens, "
          f"{args.repeats} rounds interleaved: min / median)")
    print(f"{'context tokens':>16}" + "".join(f"{name:>28}" for name in PATHS))
    for n in contexts:
        cells = [f"{min(times[(name, n)]):8.2f} / {statistics.median(times[(name, n)]):8.2f}" for name in PATHS]
        print(f"{n:>16}" + "".join(f"{c:>28}" for c in cells))
    lo, hi = contexts[0], contexts[-1]
    result = {"preset": args.preset, "device": str(device), "contexts": contexts, "tokens": args.tokens,
              "ms_per_token": {f"{name}@{n}": times[(name, n)] for name, n in times}, "ratios": {}}
    for name in PATHS:
        ratio = statistics.median(times[(name, hi)]) / statistics.median(times[(name, lo)])
        result["ratios"][name] = ratio
        print(f"{name}: {hi} / {lo} tokens of context = {ratio:.2f}x (median)")
    if args.candidates > 1:
        result["candidates"] = candidates_table(agent, states[lo], args, prompt, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def candidates_table(agent, state, args, prompt, device) -> dict:
    """ms per frame's text for each of ``candidates_paths``, interleaved; each path's median over one caption's."""
    paths = candidates_paths(args.candidates)
    logits, kv = state
    times = {name: [] for name in paths}
    with torch.no_grad():
        for r in range(args.repeats):
            for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                _sync(device)
                t0 = time.perf_counter()
                paths[name](agent, logits, kv, args.tokens, prompt.image_ids, prompt.eos_id)
                _sync(device)
                times[name].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times["one caption"])
    print(f"one frame's text, {args.tokens} tokens a caption, {kv_length(kv)} tokens of context, ms (min / median, "
          f"x one caption)")
    for name, ts in times.items():
        print(f"{name:>20}: {min(ts):8.1f} / {statistics.median(ts):8.1f}   {statistics.median(ts) / base:5.2f}x")
    return {"ms": times, "ratio_to_one": {name: statistics.median(ts) / base for name, ts in times.items()}}


if __name__ == "__main__":
    sys.exit(main())
