"""Entry point of the layer benchmark, kept for existing command lines: ``python bench/bench_layer.py ...`` is
``python -m nf4moe bench ...`` (the benchmark itself is nf4moe/benchmarks/layer.py)."""
import sys

from nf4moe.benchmarks.layer import main

if __name__ == "__main__":
    sys.exit(main())
