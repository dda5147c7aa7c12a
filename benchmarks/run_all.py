"""Run the throughput benchmarks one after another (what `make bench` calls).

    .venv/bin/python benchmarks/run_all.py            # full sizes, each appends its table to RESULTS.md
    .venv/bin/python benchmarks/run_all.py --quick    # small shapes, nothing recorded (a smoke run)
    .venv/bin/python benchmarks/run_all.py --only bench_logprobs bench_dpo_step

Each benchmark runs in its own process under the benchmark lock (/tmp/sipo_bench.lock), so two benchmark
runs on one machine never overlap. pareto_demo.py is not included: it measures quality and runs for an hour.
"""
from __future__ import annotations

import argparse
import fcntl
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (full-size arguments, quick arguments); quick runs must not append to RESULTS.md
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "bench_mod_decode": (["--policies", "lora", "--prompts", "16"],
                         ["--policies", "lora", "--prompts", "2", "--max-new-tokens", "8", "--authors-tokens", "4",
                          "--repeat", "1", "--no-record"]),
    "bench_logprobs": (["--repeat", "3"], ["--quick"]),
    "bench_dpo_step": (["--repeat", "2"], ["--quick"]),
    "bench_kv_sharing": (["--prompts", "8", "--prompt-len", "64", "--new-tokens", "64"],
                         ["--quick", "--no-record"]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, results not recorded")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = p.parse_args()
    failed = []
    with open("/tmp/sipo_bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in args.only or list(BENCHMARKS):
            argv = BENCHMARKS[name][1 if args.quick else 0]
            cmd = [sys.executable, str(HERE / f"{name}.py"), *argv]
            print(f"== {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
