"""Entry point of the training-step benchmark: ``python bench/bench_train.py ...`` is
``python -m nf4moe bench --mode fwdbwd ...`` (the benchmark itself is nf4moe/benchmarks/train.py)."""
import sys

from nf4moe.benchmarks.layer import main

if __name__ == "__main__":
    sys.exit(main(["--mode", "fwdbwd", *sys.argv[1:]]))
