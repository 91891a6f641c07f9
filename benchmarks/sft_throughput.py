"""SFT throughput: tokens/s and padding fraction, packed vs padded, measured by running train/sft.py.

    python benchmarks/sft_throughput.py                      # CPU: tiny model, packed vs padded (~3 min here)
    python benchmarks/sft_throughput.py --steps 3 --rounds 1 --max_seq_length 256 --per_device_train_batch_size 2 \
        --gradient_accumulation_steps 2                      # seconds-long smoke configuration
    python benchmarks/sft_throughput.py --gpu                # + on a CUDA GPU: 1B- and 8B-shaped models at seq 4096

What runs is the script users run: each configuration launches `python train/sft.py` (world size 1
goes through the same code path as torchrun) on a local .jsonl of chat `messages` whose token
lengths are log-normal like chat data (tiny scale: median ~150 tokens, a long tail cut at
max_seq_length). Numbers come from the script's own metrics.jsonl (`--logging_steps 1`):
perf/tokens_per_s_per_device (non-pad tokens per second; the window covers collation, forward,
backward and the optimizer step, not logging) and perf/padding_fraction. Reported: the median over
steps after `--warmup` steps of every round; layouts run interleaved (packed, padded, packed, ...)
so drift in machine load hits both alike.

GPU rows (`--gpu`; written on a machine without a GPU and NOT run there: untested): a Llama-3.2-1B-
shaped and a Llama-3.1-8B-shaped model with random bf16 weights written to a local folder (with the
tiny tokenizer: throughput does not depend on token ids), seq 4096, per-device batch 1, packing,
bf16 compute, activation checkpointing; tokens/s/GPU and MFU (perf/mfu: PaLM 6N + 12·L·H·S over the
vendor's dense bf16 peak). The 8B shape needs ~16 bytes/param of fp32 params + grads + AdamW
(~120 GiB): with CPU offload when the host has the RAM, else on the GPU when it has the memory
(H200), else with as many of its 32 layers as fit the host RAM under offload (the table says how
many). Without flash-attn (not on the lent machines), packed rows use sdpa with a block-diagonal mask.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass
class Args:
    max_seq_length: int = 1024
    """sequence length (the tiny model's max_position_embeddings is 1024)"""
    per_device_train_batch_size: int = 4
    """sequences per micro-batch (packed: one row of up to batch·max_seq_length tokens)"""
    gradient_accumulation_steps: int = 4
    """micro-batches per optimizer step (packed: the step's batch·accum examples best-fit packed)"""
    steps: int = 8
    """optimizer steps per run"""
    warmup: int = 2
    """steps dropped from the start of each run before taking medians"""
    rounds: int = 2
    """interleaved rounds of (packed, padded)"""
    median_tokens: int = 150
    """median conversation length in tokens (log-normal)"""
    sigma: float = 1.0
    """log-normal sigma of the lengths (1.0: p90 ≈ 3.6 × median)"""
    examples: int = 1024
    """rows in the synthetic chat file"""
    tiny: bool = True
    """the tiny-model packed-vs-padded table (--no-tiny: only the GPU rows)"""
    gpu: bool = False
    """also the GPU rows (1B- and 8B-shaped, seq 4096); needs CUDA"""
    gpu_steps: int = 8
    """optimizer steps per GPU run"""
    gpu_shapes: tuple[str, ...] = ("llama-1b", "llama-3.1-8b")
    """tulu.memory shapes for the GPU rows"""
    gpu_model_dir: str = "/tmp/tulu_bench_models"
    """where the random-weight GPU model folders are written (8B: ~16 GB of bf16 safetensors)"""
    seed: int = 0
    """data seed"""


# ------------------------------------------------------------------------------ data


def digits(rng: np.random.Generator, n: int) -> str:
    """n random decimal digits: the tiny tokenizer splits digits individually, so this is exactly n tokens
    (token ids do not change throughput; lengths are what matter)."""
    return "".join(map(str, rng.integers(0, 10, n)))


def lognormal_lengths(n: int, median: int, sigma: float, max_len: int, seed: int) -> np.ndarray:
    """Long-tailed lengths like chat data: log-normal around `median`, at least 16, cut at max_len."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 16, max_len).astype(int)


def chat_rows(tokenizer, n: int, median: int, sigma: float, max_len: int, seed: int) -> list[dict]:
    """n single-turn chats of log-normal total length: ~30% user, ~70% assistant, random digits."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for k, total in enumerate(lognormal_lengths(n, median, sigma, max_len, seed)):
        body = max(8, int(total) - 8)  # the template adds ~8 tokens (<|user|>, <|assistant|>, newlines, eos)
        n_user = max(2, int(0.3 * body))
        user, assistant = digits(rng, n_user), digits(rng, body - n_user)
        rows.append({"id": f"bench_{k}", "messages": [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": assistant}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def length_stats(tokenizer, rows: list[dict], max_len: int) -> dict:
    """Token lengths after the chat template and truncation, exactly as the SFT data path makes them."""
    from tulu.chat import tokenize_sft

    lens = np.array([len(tokenize_sft(tokenizer, r["messages"], max_len)["input_ids"]) for r in rows])
    return {"n": len(lens), "median": int(np.median(lens)), "mean": float(lens.mean()),
            "p90": int(np.percentile(lens, 90)), "p99": int(np.percentile(lens, 99)), "max": int(lens.max())}


# ------------------------------------------------------------------------------ running the scripts


def run_script(script: str, flags: list[str], python: str = sys.executable, env: dict | None = None,
               timeout: float = 3600) -> list[dict]:
    """Run `python train/<script> ...` in a fresh output folder; return its metrics.jsonl rows that carry
    perf/tokens_per_s_per_device (one per optimizer step with --logging_steps 1)."""
    with tempfile.TemporaryDirectory(prefix="tulu-bench-") as out:
        cmd = [python, str(ROOT / "train" / script), *flags, "--output_dir", out, "--logging_steps", "1"]
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # prepended
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": pythonpath, "WANDB_MODE": "disabled", **(env or {})})
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "perf/tokens_per_s_per_device" in row]


def sft_flags(data: Path, n_rows: int, max_seq_length: int, batch: int, accum: int, steps: int,
              packing: bool, *extra: str) -> list[str]:
    return ["--dataset_mixer_list", str(data), str(n_rows), "--max_seq_length", str(max_seq_length),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accum),
            "--max_train_steps", str(steps), "--packing", str(packing), "--learning_rate", "1e-4",
            "--warmup_ratio", "0", *extra]


def median_after_warmup(runs: list[list[dict]], key: str, warmup: int) -> float:
    vals = [row[key] for rows in runs for row in rows[min(warmup, len(rows) - 1):]]
    return statistics.median(vals)


# ------------------------------------------------------------------------------ CPU: packed vs padded


def cpu_table(args: Args) -> dict:
    from tulu.model import load_tokenizer

    tokenizer = load_tokenizer("tulu/tiny")
    work = Path(tempfile.mkdtemp(prefix="tulu-sft-bench-"))
    try:
        rows = chat_rows(tokenizer, args.examples, args.median_tokens, args.sigma, args.max_seq_length, args.seed)
        data = write_jsonl(work / "chat.jsonl", rows)
        st = length_stats(tokenizer, rows, args.max_seq_length)
        runs: dict[bool, list[list[dict]]] = {True: [], False: []}
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            for packing in (True, False):
                runs[packing].append(run_script("sft.py", sft_flags(
                    data, len(rows), args.max_seq_length, args.per_device_train_batch_size,
                    args.gradient_accumulation_steps, args.steps, packing)))
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res = {p: {"tps": median_after_warmup(runs[p], "perf/tokens_per_s_per_device", args.warmup),
               "pad": median_after_warmup(runs[p], "perf/padding_fraction", args.warmup)} for p in (True, False)}
    import torch
    where = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU"
    print(f"### SFT throughput on {where}, tiny model (train/sft.py, world size 1): packed vs padded\n")
    print(f"data: {st['n']} synthetic chats, log-normal token lengths: median {st['median']}, mean {st['mean']:.0f}, "
          f"p90 {st['p90']}, p99 {st['p99']}, max {st['max']} (cut at max_seq_length {args.max_seq_length}); "
          f"per-device batch {args.per_device_train_batch_size}, grad accum {args.gradient_accumulation_steps}, "
          f"{args.steps} steps × {args.rounds} interleaved rounds, median over steps after {args.warmup} warm-up "
          f"steps; {wall:.0f} s wall\n")
    print("| layout | tokens/s (non-pad, median) | padding fraction | speed-up vs padded |")
    print("|---|---|---|---|")
    for p in (True, False):
        print(f"| {'packed (padding-free)' if p else 'padded'} | {res[p]['tps']:.0f} | {res[p]['pad']:.3f} | "
              f"{res[p]['tps'] / res[False]['tps']:.2f}x |")
    return {"packed": res[True], "padded": res[False], "lengths": st}


# ------------------------------------------------------------------------------ GPU: 1B / 8B shapes (untested here)


def write_random_model(folder: Path, shape: str, layers: int | None = None, vocab_size: int | None = None) -> int:
    """A Llama-shaped folder with random bf16 weights and the tiny tokenizer; returns #params.
    One random tensor per distinct shape, cloned per key: writing 8B weights takes seconds, not minutes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tulu.memory import llama_config
    from tulu.tiny import tiny_dir

    config = llama_config(shape, **({"num_hidden_layers": layers} if layers else {}),
                          **({"vocab_size": vocab_size} if vocab_size else {}))
    done = folder / "model.safetensors.index.json"
    if done.exists():
        old = json.loads((folder / "config.json").read_text())
        if (old["num_hidden_layers"], old["vocab_size"]) == (config.num_hidden_layers, config.vocab_size):
            return json.loads(done.read_text())["metadata"]["total_params"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    by_shape: dict[tuple, torch.Tensor] = {}
    weight_map, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n_shard = {}, 0, n_shard + 1

    for name, p in meta.named_parameters():
        key = tuple(p.shape)
        if key not in by_shape:
            by_shape[key] = (torch.randn(key, generator=g) * 0.02).to(torch.bfloat16) if p.ndim > 1 else torch.ones(key, dtype=torch.bfloat16)
        shard[name] = by_shape[key].clone()
        shard_bytes += p.numel() * 2
        total += p.numel()
        if shard_bytes > 4 * 2**30:
            flush()
    flush()
    config.save_pretrained(folder)
    src = tiny_dir()
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json") and f.is_file():
            shutil.copy(f, folder / f.name)
    done.write_text(json.dumps({"metadata": {"total_params": total}, "weight_map": weight_map}))
    return total


def plan_8b(shape: str) -> tuple[bool, int | None, str]:
    """(cpu_offload, layers or None = all, note) that fits this machine: fp32 params + grads + AdamW = 16 B/param."""
    import torch

    from tulu.memory import llama_config

    cfg = llama_config(shape)
    per_layer = 4 * cfg.hidden_size * cfg.hidden_size * (1 + cfg.num_key_value_heads / cfg.num_attention_heads) \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    emb = 2 * cfg.vocab_size * cfg.hidden_size
    state = lambda n_layers: 16 * (emb + n_layers * per_layer)  # noqa: E731
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_properties(0).total_memory
    if state(cfg.num_hidden_layers) * 1.4 < host:  # headroom: page cache of the weights, buffers, the process
        return True, None, "CPU offload"
    if state(cfg.num_hidden_layers) + 12 * 2**30 < gpu:
        return False, None, "on GPU (no offload)"
    layers = max(1, int((host / 1.4 / 16 - emb) // per_layer))
    return True, layers, f"CPU offload, {layers} of {cfg.num_hidden_layers} layers (host RAM {host / 2**30:.0f} GiB)"


def gpu_table(args: Args) -> list[dict]:
    import torch

    from tulu.model import load_tokenizer

    name = torch.cuda.get_device_name()
    tokenizer = load_tokenizer("tulu/tiny")
    seq, results = 4096, []
    data_dir = Path(tempfile.mkdtemp(prefix="tulu-sft-gpu-"))
    rows = chat_rows(tokenizer, 2048, 512, 1.0, seq, args.seed)  # Tulu-3-SFT-like: median ~500 tokens, tail to 4096
    data = write_jsonl(data_dir / "chat.jsonl", rows)
    print(f"\n### SFT on one GPU ({name}): train/sft.py, seq {seq}, packing, bf16, activation checkpointing\n")
    print("| model | params (B) | placement | tokens/s/GPU | MFU | padding fraction |")
    print("|---|---|---|---|---|---|")
    for shape in args.gpu_shapes:
        offload, layers, note = plan_8b(shape) if "8b" in shape else (False, None, "on GPU")
        folder = Path(args.gpu_model_dir) / f"{shape}-{layers or 'all'}"
        t0 = time.perf_counter()
        n = write_random_model(folder, shape, layers)
        print(f"<!-- wrote {folder} ({n / 1e9:.2f}B params) in {time.perf_counter() - t0:.0f} s -->", flush=True)
        flags = sft_flags(data, len(rows), seq, 1, 16, args.gpu_steps, True, "--model_name_or_path", str(folder),
                          "--mixed_precision", "bf16", "--gradient_checkpointing",
                          *(["--cpu_offload"] if offload else []))
        try:
            run = run_script("sft.py", flags, timeout=3000)
            tps = median_after_warmup([run], "perf/tokens_per_s_per_device", args.warmup)
            mfu = median_after_warmup([run], "perf/mfu", args.warmup) if "perf/mfu" in run[-1] else math.nan
            pad = median_after_warmup([run], "perf/padding_fraction", args.warmup)
            print(f"| {shape} | {n / 1e9:.2f} | {note} | {tps:.0f} | {100 * mfu:.1f}% | {pad:.3f} |", flush=True)
            results.append({"shape": shape, "params": n, "placement": note, "tps": tps, "mfu": mfu})
        except Exception as e:  # keep going: the other shape's row is still worth having
            print(f"| {shape} | {n / 1e9:.2f} | {note} | failed: {str(e).splitlines()[-1][:200]} | | |", flush=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    return results


def main(args: Args) -> None:
    import torch

    print(f"torch {torch.__version__}; {os.cpu_count()} CPU cores; torch threads {torch.get_num_threads()}; "
          f"{'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n")
    if args.tiny:
        cpu_table(args)
    if args.gpu:
        if not torch.cuda.is_available():
            print("\n(--gpu given but no CUDA device: GPU rows skipped)")
        else:
            gpu_table(args)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
