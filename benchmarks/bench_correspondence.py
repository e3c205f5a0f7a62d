"""Time the vectorized correspondence targets against the per-token loop reference, on the same origins.

    python -m benchmarks.bench_correspondence --batch_size 64 --view_tokens 14 --device cpu

(run from the repository root).

Both implementations get the same random view origins; the script checks that they agree, then prints
the median time of each over `--repeats` interleaved runs (after a warm-up) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ace_hf.correspondence_ace import correspondence_targets, sample_view_origins
from benchmarks.loop_targets import loop_correspondence_targets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--view_tokens", type=int, default=14)
    parser.add_argument("--grid_size", type=int, default=32, help="cells per image side (ACE: 32)")
    parser.add_argument("--min_overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--device", default="cpu", help="device of the vectorized version (the loop runs on CPU)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_seconds(
    functions: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds, after one untimed warm-up round.

    The functions take turns within each round, so that a slow spell of a shared machine hits all of them.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats + 1):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # one thread is steadier on a machine shared with other jobs
    generator = torch.Generator().manual_seed(args.seed)
    origins = sample_view_origins(
        args.batch_size, args.grid_size, args.view_tokens, args.min_overlap, generator
    )
    origins_on_device = origins.to(device)

    def vectorized():
        return correspondence_targets(origins_on_device, args.view_tokens)

    def loop():
        return loop_correspondence_targets(origins, args.view_tokens)

    fast, slow = vectorized(), loop()
    pairs = zip(
        (fast.overlap_large, fast.overlap_small, fast.decomposition, fast.composition), slow, strict=True
    )
    if not all(torch.allclose(a.cpu().float(), b.float()) for a, b in pairs):
        raise SystemExit("the vectorized and loop targets disagree")

    seconds = median_seconds({"loop": loop, "vectorized": vectorized}, args.repeats, device)
    loop_time, vectorized_time = seconds["loop"], seconds["vectorized"]
    print(
        f"batch {args.batch_size}, n = {args.view_tokens}, grid {args.grid_size}, "
        f"vectorized on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("targets agree")
    print(f"loop (python, cpu): {loop_time * 1e3:10.2f} ms (median of {args.repeats} runs)")
    print(f"vectorized:         {vectorized_time * 1e3:10.2f} ms (median of {args.repeats} runs)")
    print(f"speed-up:           {loop_time / vectorized_time:10.1f}x")


if __name__ == "__main__":
    main()
