"""Packing: the C++ first-fit-decreasing packer vs the same algorithm in Python.

    python benchmarks/bench_packing.py [--n 1000000] [--capacity 4096]

Lengths follow a long-tailed (log-normal) distribution clipped to the capacity, like chat
data; prints the speed ratio and the share of bin capacity filled.
"""
import argparse
import time

import numpy as np

from aligner.data.packing import efficiency, ffd_python, pack_lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.lognormal(mean=6.0, sigma=1.0, size=args.n).astype(np.int64), 1, args.capacity)
    as_list = lengths.tolist()
    from aligner import _C

    t = time.perf_counter()
    _C.ffd_pack(lengths, args.capacity)  # the packer: bin of every item + CSR members
    t_kernel = time.perf_counter() - t
    t = time.perf_counter()
    cpp = pack_lengths(lengths, args.capacity)  # the same, converted to Python lists of bins
    t_cpp = time.perf_counter() - t
    t = time.perf_counter()
    py = ffd_python(as_list, args.capacity)
    t_py = time.perf_counter() - t
    assert cpp == py, "C++ and Python packers disagree"
    print(f"{args.n} lengths (log-normal, median {int(np.median(lengths))}, p99 {int(np.percentile(lengths, 99))},"
          f" max {int(lengths.max())}), capacity {args.capacity}")
    print(f"C++ packer (arrays):           {t_kernel:8.3f} s")
    print(f"C++ packer + Python bin lists: {t_cpp:8.3f} s")
    print(f"Python packer:                 {t_py:8.3f} s")
    print(f"speed ratio (arrays):          {t_py / t_kernel:8.1f}x")
    print(f"speed ratio (with lists):      {t_py / t_cpp:8.1f}x")
    print(f"bins: {len(cpp)}, efficiency (tokens / bin capacity): {100 * efficiency(as_list, cpp, args.capacity):.2f}%")


if __name__ == "__main__":
    main()
