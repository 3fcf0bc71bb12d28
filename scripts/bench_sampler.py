"""Benchmark penrun's vMF sampler against torch.randn and scipy.stats.vonmises_fisher.

Two draws of n samples in R^d: (a) one direction with kappa = 50; (b) 10 classes with
kappas linspace(10, 80, 10) (a plausible spread for a trained head, not read from a teacher
checkpoint), class-balanced labels. Timings alternate randn and the sampler and report the
fastest repeat of each (other load on the machine only ever adds time); scipy runs after all
torch timings, so its BLAS threads do not compete with torch's. Peak memory: each case runs in
a fresh subprocess that resets the kernel's peak-RSS counter (VmHWM, /proc/self/clear_refs)
after setup, so the peak counts everything the sampler touches, not only torch's tensors;
on CUDA, torch.cuda.max_memory_allocated. Prints a Markdown report.

    python scripts/bench_sampler.py --device cpu --n 65536 --d 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from penrun.core.vmf import sample_vmf

from machine import describe_machine
from timing import interleaved, timed

CASES = {"single": "(a) one mu, kappa = 50", "classes": "(b) 10 classes, kappa 10..80"}


def setup(case: str, n: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(mu (M, d), per-sample kappa (n,), class index (n,) or None)."""
    gen = torch.Generator().manual_seed(0)
    if case == "single":
        mu = torch.nn.functional.normalize(torch.randn(1, d, generator=gen), dim=1)
        return mu.to(device), torch.full((n,), 50.0, device=device), None
    mu = torch.nn.functional.normalize(torch.randn(10, d, generator=gen), dim=1)
    y = (torch.randperm(n, generator=gen) % 10).to(device)
    return mu.to(device), torch.linspace(10, 80, 10, device=device)[y], y


def time_case(case: str, n: int, d: int, device: str, repeats: int) -> tuple[float, float]:
    """Fastest seconds of (penrun sampler, torch.randn(n, d)), measured alternately."""
    mu, kappa, index = setup(case, n, d, device)
    gen = torch.Generator(device).manual_seed(1)

    def sampler() -> torch.Tensor:
        return sample_vmf(mu, kappa, index, generator=gen)

    def randn() -> torch.Tensor:
        return torch.randn(n, d, device=device, generator=gen)

    sampler(), randn()  # warm up
    times = interleaved(
        {"ours": lambda: timed(sampler, device)[1], "randn": lambda: timed(randn, device)[1]}, repeats
    )
    return min(times["ours"]), min(times["randn"])


def time_scipy(case: str, n: int, d: int) -> float:
    """Seconds for scipy.stats.vonmises_fisher to draw the same n samples (one call per class)."""
    from scipy.stats import vonmises_fisher

    mu, _, index = setup(case, n, d, "cpu")
    counts = [n] if index is None else torch.bincount(index, minlength=len(mu)).tolist()
    kappas = [50.0] if index is None else torch.linspace(10, 80, 10).tolist()

    def draw() -> None:
        for m, k, c in zip(mu.double().numpy(), kappas, counts, strict=True):
            vonmises_fisher(m, k).rvs(c, random_state=0)

    return timed(draw)[1]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def probe(what: str, case: str, n: int, d: int, device: str) -> None:
    """In a fresh process: peak extra bytes of one sampler or randn call, as JSON."""
    mu, kappa, index = setup(case, n, d, device)
    gen = torch.Generator(device).manual_seed(1)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = current_rss()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if what == "sampler":
        out = sample_vmf(mu, kappa, index, generator=gen)
    else:
        out = torch.randn(n, d, device=device, generator=gen)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_rss() - before
    print(json.dumps({"peak": peak, "output": out.numel() * out.element_size()}))


def measure_memory(what: str, case: str, n: int, d: int, device: str) -> dict[str, int]:
    args = ["--probe", what, "--case", case, "--n", str(n), "--d", str(d), "--device", device]
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace) -> None:
    device = args.device
    print(f"- machine: {describe_machine(device)}")
    print(f"- n = {args.n}, d = {args.d}, float32, fastest of {args.repeats} alternating repeats")
    print()
    print(
        "| draw | penrun (ms) | randn (ms) | penrun / randn | penrun samples/s "
        "| scipy (ms) | penrun vs scipy | peak extra memory / output (randn) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    times = {case: time_case(case, args.n, args.d, device, args.repeats) for case in CASES}
    for case, label in CASES.items():
        ours, base = times[case]
        scipy_cells = "- | -"
        if args.scipy:
            scipy_s = time_scipy(case, args.n, args.d)
            scipy_cells = f"{scipy_s * 1e3:.0f} | {scipy_s / ours:.0f}x"
        mem = measure_memory("sampler", case, args.n, args.d, device)
        mem_randn = measure_memory("randn", case, args.n, args.d, device)
        print(
            f"| {label} | {ours * 1e3:.0f} | {base * 1e3:.0f} | {ours / base:.2f}x "
            f"| {args.n / ours:.3g} | {scipy_cells} "
            f"| {mem['peak'] / mem['output']:.2f}x ({mem_randn['peak'] / mem_randn['output']:.2f}x) |"
        )
    print(f"\nload average (1, 5, 15 min) at the end: {Path('/proc/loadavg').read_text()[:14]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-scipy", dest="scipy", action="store_false", help="skip scipy")
    parser.add_argument("--probe", choices=["sampler", "randn"], help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.probe:
        probe(args.probe, args.case, args.n, args.d, args.device)
    else:
        report(args)


if __name__ == "__main__":
    main()
