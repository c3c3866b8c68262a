"""`python -m nf4moe demo` (the README's first command) and the `bench` hand-over, on tiny shapes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nf4moe.__main__ as cli

TINY = ["--tokens", "16", "--experts", "4", "--hidden", "128", "--intermediate", "64", "--top-k", "2",
        "--device", "cpu", "--backend", "reference", "--min-calls", "1", "--time-budget", "0"]


def _check_demo_output(text: str) -> None:
    assert "Qwen3-30B-A3B is E=128, H=2048, I=768, top-8" in text  # the real shape is stated
    assert "E=4, H=128, I=64, top-2" in text
    assert "backend=reference" in text
    m = re.search(r"memory\s+bf16 ([0-9.]+) MiB -> NF4 ([0-9.]+) MiB \(([0-9.]+)x smaller, ([0-9.]+) bits/weight\)", text)
    assert m, text
    bf16_mib, nf4_mib, ratio, bits = map(float, m.groups())
    assert bf16_mib == pytest.approx(4 * 3 * 128 * 64 * 2 / 2**20, abs=0.006)
    # Tiny layers carry the fixed 1 KiB nested code table; still well under bf16.
    assert 2.0 < ratio < 4.0 and 4.0 < bits < 8.0 and nf4_mib < bf16_mib
    m = re.search(r"\|\|out_nf4 - out_bf16\|\| / \|\|out_bf16\|\| = ([0-9.]+)\s+\(weights alone: ([0-9.]+)", text)
    assert m, text
    out_err, w_err = map(float, m.groups())
    # NF4 rounds Gaussian weights with ~9% relative error; three projections in a row compound it.
    assert 0.05 < w_err < 0.15 and 0.05 < out_err < 0.4
    m = re.search(r"time\s+NF4 layer \(reference\) ([0-9.]+) ms per call \((\d+) calls\); "
                  r"bf16 reference layer ([0-9.]+) ms per call", text)
    assert m, text
    assert float(m.group(1)) > 0 and int(m.group(2)) >= 1


def test_demo_main(capsys):
    assert cli.main(["demo", *TINY, "--seed", "3"]) == 0
    _check_demo_output(capsys.readouterr().out)


def test_demo_seed_changes_data(capsys):
    cli.main(["demo", *TINY, "--seed", "1"])
    a = capsys.readouterr().out
    cli.main(["demo", *TINY, "--seed", "2"])
    b = capsys.readouterr().out
    err = re.compile(r"= ([0-9.]+)\s+\(weights alone")
    assert err.search(a).group(1) != err.search(b).group(1)


def test_demo_module_entry_point():
    # The README's first command, as a subprocess: `python -m nf4moe demo` from the repo root.
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "nf4moe", "demo", *TINY], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_demo_output(proc.stdout)


def test_demo_bad_top_k():
    with pytest.raises(SystemExit, match="--top-k must be between 1 and --experts"):
        cli.main(["demo", *TINY, "--top-k", "9"])


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "demo" in capsys.readouterr().err


def test_demo_rejects_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err


def test_bench_missing_file_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_bench_dir", lambda: tmp_path / "bench")
    with pytest.raises(SystemExit, match=r"bench_layer\.py not found.*source checkout"):
        cli.main(["bench"])


def test_bench_hands_over_all_arguments(monkeypatch, tmp_path):
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "__init__.py").write_text("")  # a regular package, like the checkout's bench/
    (bench_dir / "bench_layer.py").write_text(
        "CALLS = []\n"
        "def main(argv):\n"
        "    CALLS.append(list(argv))\n"
        "    return 0\n"
    )
    monkeypatch.setattr(cli, "_bench_dir", lambda: bench_dir)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("bench", "bench.bench_layer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert cli.main(["bench", "--shape", "qwen3", "--json", "x.json"]) == 0
    assert sys.modules["bench.bench_layer"].CALLS == [["--shape", "qwen3", "--json", "x.json"]]
