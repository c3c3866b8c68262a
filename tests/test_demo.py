"""`python -m nf4moe demo` (the README's first command: QLoRA fine-tuning of the packaged tiny model),
`layer-demo` (one quantized expert layer), and the `bench` / `plot` hand-overs, on tiny shapes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_layer_demo_main(capsys):
    assert cli.main(["layer-demo", *TINY, "--seed", "3"]) == 0
    _check_demo_output(capsys.readouterr().out)


def test_layer_demo_seed_changes_data(capsys):
    cli.main(["layer-demo", *TINY, "--seed", "1"])
    a = capsys.readouterr().out
    cli.main(["layer-demo", *TINY, "--seed", "2"])
    b = capsys.readouterr().out
    err = re.compile(r"= ([0-9.]+)\s+\(weights alone")
    assert err.search(a).group(1) != err.search(b).group(1)


def test_layer_demo_bad_top_k():
    with pytest.raises(SystemExit, match="--top-k must be between 1 and --experts"):
        cli.main(["layer-demo", *TINY, "--top-k", "9"])


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "layer-demo"])
def test_demo_rejects_unknown_flags(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err


def test_bench_hands_over_all_arguments(monkeypatch):
    from nf4moe.benchmarks import layer

    calls = []
    monkeypatch.setattr(layer, "main", lambda argv: calls.append(list(argv)) or 0)
    assert cli.main(["bench", "--shapes", "qwen3", "--out", "x"]) == 0
    assert calls == [["--shapes", "qwen3", "--out", "x"]]


def test_bench_runs_from_the_package_not_the_checkout(tmp_path):
    """`python -m nf4moe bench` imports the packaged benchmark (no bench/ on the path, as in an installed wheel),
    and `import nf4moe` imports no benchmark code."""
    code = ("import sys, nf4moe, nf4moe.__main__ as cli\n"
            "assert not any(m.startswith(('nf4moe.benchmarks', 'bench')) for m in sys.modules), sorted(sys.modules)\n"
            "sys.exit(cli.main(['bench', '--help']))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "--mode" in res.stdout and "--shapes" in res.stdout


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit, match=r"pip install nf4moe\[plot\]"):
        cli.main(["plot"])


# ---------------------------------------------------------------------------------------------- demo (QLoRA)
def _env() -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _number(pattern: str, text: str) -> tuple[float, ...]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return tuple(float(g.replace(",", "")) for g in m.groups())


def test_finetune_demo_learns_saves_and_reloads(capsys, tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh random init, batches and sample each run
    assert cli.main(["demo", "--steps", "40", "--device", "cpu", "--seed", str(seed), "--out", str(tmp_path),
                     "--no-progress", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert f"random init, seed {seed}" in out and "backend=reference" in out
    # LoRA on both projections of all 8 experts of both layers: 8 * 16 * ((128 + 256) + (128 + 128)) per layer
    assert "163,840 parameters on experts" in out and "on 8 attention projections" in out
    first, last = _number(r"loss\s+train \(mean of \d+ steps\) ([0-9.]+) -> ([0-9.]+)", out)
    before, after = _number(r"held-out ([0-9.]+) -> ([0-9.]+)", out)
    # Held-out loss at the random init is near ln(259) = 5.56 (a little above: the init's logits are not
    # flat); 40 steps of LoRA learn at least the byte statistics of English text, well below 4.5 nats.
    assert before > 5.0
    assert after < before - 1.0 and last < first - 1.0 and after < 4.5, out
    assert re.search(r"reloaded\s+fresh model \+ load_lora: logits identical .*max \|diff\| = 0\)", out), out
    tok_s, mem = _number(r"training\s+40 steps in [0-9.]+ s \(([0-9,]+) tokens/s, peak RSS ([0-9.]+) GiB\)", out)
    assert tok_s > 0 and 0.05 < mem < 64
    assert re.search(r"sample\s+after training \(reloaded model\): 'Nora has five pears\.", out)
    adapter = tmp_path / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(cfg["target_parameters"]) == sorted(f"model.layers.{i}.mlp.experts.{p}"
                                                      for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert (adapter / "adapter_model.safetensors").stat().st_size > 100_000


def test_finetune_demo_custom_model_and_data(capsys, tmp_path):
    """--model as a config JSON (smaller than the packaged one), --data as a local text file, experts-only LoRA."""
    from nf4moe.finetune import DEFAULT_CONFIG

    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg.update(num_hidden_layers=1, num_experts=4, hidden_size=64, head_dim=16)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    words = ["".join(chr(int(c)) for c in torch.randint(97, 123, (int(n),))) for n in torch.randint(2, 8, (60,))]
    lines = [" ".join(words[int(i)] for i in torch.randint(0, 60, (12,))) for _ in range(200)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    assert cli.main(["demo", "--steps", "8", "--device", "cpu", "--model", str(tmp_path / "cfg.json"),
                     "--data", str(tmp_path / "text.txt"), "--lora-targets", "none", "--rank", "4",
                     "--seq-len", "64", "--batch-size", "4", "--no-progress", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "1 layers, hidden 64, 1 MoE layers" in out
    assert "LoRA      r=4, alpha=8: " in out and "attention" not in out.split("LoRA", 1)[1].split("\n")[0]
    assert "text.txt:" in out and "logits identical" in out


def test_finetune_demo_bad_steps():
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        cli.main(["demo", "--steps", "0", "--device", "cpu"])


def test_finetune_demo_module_entry_point(tmp_path):
    # The README's first command as a subprocess (`python -m nf4moe demo`), shortened; the progress bar is on.
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "nf4moe", "demo", "--steps", "6", "--device", "cpu",
                           "--max-new-tokens", "4"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "training:" in proc.stderr and "6/6" in proc.stderr  # tqdm writes to stderr
    assert "logits identical" in proc.stdout and "done in" in proc.stdout
    assert not any(tmp_path.iterdir()), "the demo left files in the working directory without --out"
    assert root.is_dir()


def test_layer_demo_module_entry_point():
    # `python -m nf4moe layer-demo` from the repo root.
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "nf4moe", "layer-demo", *TINY], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_demo_output(proc.stdout)


def test_plot_hands_over_arguments(monkeypatch):
    import nf4moe.plot

    calls = []
    monkeypatch.setattr(nf4moe.plot, "main", lambda argv: calls.append(list(argv)) or 0)
    assert cli.main(["plot", "--out", "x", "a.json"]) == 0
    assert calls == [["--out", "x", "a.json"]]
