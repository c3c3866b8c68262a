"""``python -m nf4moe plot [JSON or folder ...] [--out DIR]``: PNG plots of the benchmark JSON files.

Inputs (default: ``bench/results/`` of the source checkout) are the files the benchmarks write:

- layer benchmarks (``python -m nf4moe bench``): rows with ``shape, mode, tokens, impl, ms, floor_ms,
  extra_mem_gib``.  Per mode, ``<stem>_<mode>_time.png``: time per call against tokens, log-log, one
  panel per shape, every implementation beside the floor (CUDA-graph rows as hollow markers);
  where rows carry ``extra_mem_gib`` (fwd+bwd), ``<stem>_<mode>_memory.png``: extra peak memory bars.
- end-to-end benchmark (``bench/bench_e2e.py``, ``"kind": "e2e"``): rows with ``part, impl,
  tokens_per_s, peak_mem_gib`` -> ``<stem>_e2e.png``: training tokens/s and peak memory per
  implementation (reduced depth), and the full model's peak memory against its budget.

One figure set per input file, so numbers from different GPUs or runs never share an axis; the
title carries the device, versions and date from the file's ``env``.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

GRAPH_SUFFIX = " [CUDA graph]"
# Colour by implementation family (substring, colour), so a peer keeps its colour across plots.
FAMILIES = (
    ("nf4moe", "#2ca02c"),
    ("dequant", "#ff7f0e"),
    ("PEFT", "#d62728"),
    ("bitsandbytes", "#d62728"),
    ("grouped_mm bf16", "#1f77b4"),
    ("transformers", "#1f77b4"),
)
# Shape names of nf4moe/benchmarks/layer.py -> what they are, for panel titles.
SHAPE_TITLES = {
    "qwen3": "Qwen3-30B-A3B layer (E=128, H=2048, I=768, top-8)",
    "glm45air": "GLM-4.5-Air layer (E=128, H=4096, I=1408, top-8)",
    "dsv3": "DeepSeek-V3 layer (E=256, H=7168, I=2048, top-8)",
}
EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def tokens_label(t: int) -> str:
    """1, 16, 128, 1k, 8k, 16k: short enough for neighbouring ticks on a log axis."""
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else f"{t:,}"


def _checkout_bench() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def colour_of(impl: str, extra: dict[str, str]) -> str:
    for key, colour in FAMILIES:
        if key in impl:
            return colour
    if impl not in extra:
        extra[impl] = EXTRA_COLOURS[len(extra) % len(EXTRA_COLOURS)]
    return extra[impl]


def env_line(env: dict) -> str:
    """Two lines: device and date; library versions."""
    if not env:
        return ""
    first = ", ".join(p for p in (env.get("gpu", ""), env.get("date", "")) if p)
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "bitsandbytes", "peft")
                         if env.get(k))
    return "\n".join(p for p in (first, versions) if p)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _plain_log_formatter():
    """Log-axis labels as plain numbers (0.01, 0.5, 20); minor ticks labelled only on axes spanning few decades."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5))


def _grid(n: int, width: float = 5.6, height: float = 4.3):
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 8.5), height * rows + 2.0), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _finish(fig, title: str, env: dict, handles, labels, path: Path) -> Path:
    fig.suptitle(title + ("\n" + env_line(env) if env else ""), fontsize=11)
    bottom = 0.0
    if handles:
        ncol = 2 if fig.get_figwidth() < 12 else 3
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
        bottom = (0.25 * math.ceil(len(labels) / ncol) + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------- layer
def plot_layer_time(rows: list[dict], env: dict, mode: str, path: Path) -> Path:
    """Time per call vs tokens (log-log), one panel per shape, each implementation and the floor."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = _grid(len(shapes))
    extra: dict[str, str] = {}
    legend: dict[str, object] = {}
    for ax, shape in zip(axes, shapes):
        sr = [r for r in rows if r["shape"] == shape]
        by_impl: dict[str, list[dict]] = defaultdict(list)
        for r in sr:
            by_impl[r["impl"]].append(r)
        for impl, rs in by_impl.items():
            rs = sorted(rs, key=lambda r: r["tokens"])
            graph = impl.endswith(GRAPH_SUFFIX)
            base = impl[: -len(GRAPH_SUFFIX)] if graph else impl
            colour = colour_of(base, extra)
            xs, ys = [r["tokens"] for r in rs], [r["ms"] for r in rs]
            if graph:
                (h,) = ax.plot(xs, ys, linestyle="none", marker="D", markersize=7, markerfacecolor="none",
                               markeredgecolor=colour, markeredgewidth=1.5)
                label = f"{base} (CUDA graph)"
            else:
                (h,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, color=colour)
                label = impl
            legend.setdefault(label, h)
        floor = sorted({(r["tokens"], r["floor_ms"]) for r in sr if r.get("floor_ms")})
        if floor:
            (h,) = ax.plot([t for t, _ in floor], [f for _, f in floor], linestyle="--", color="black",
                           linewidth=1.2)
            legend.setdefault("floor (bytes / copy bandwidth, FLOPs / matmul rate)", h)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["tokens"] for r in sr})
        ax.set_xticks(ticks, [tokens_label(t) for t in ticks])
        ax.xaxis.set_minor_locator(_pyplot().NullLocator())
        ax.yaxis.set_major_formatter(_plain_log_formatter())
        ax.yaxis.set_minor_formatter(_plain_log_formatter())
        ax.set_title(SHAPE_TITLES.get(shape, shape), fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    return _finish(fig, f"Expert layer, {mode}: time per call (lower is better)", env, list(legend.values()),
                   list(legend.keys()), path)


def plot_layer_memory(rows: list[dict], env: dict, mode: str, path: Path) -> Path:
    """Extra peak memory of one call (fwd+bwd step) per implementation, grouped by tokens, one panel per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = _grid(len(shapes))
    extra: dict[str, str] = {}
    legend: dict[str, object] = {}
    for ax, shape in zip(axes, shapes):
        sr = [r for r in rows if r["shape"] == shape]
        tokens = sorted({r["tokens"] for r in sr})
        impls = list(dict.fromkeys(r["impl"] for r in sr))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = {r["tokens"]: r["extra_mem_gib"] for r in sr if r["impl"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, t in enumerate(tokens) if t in vals]
            ys = [vals[t] for t in tokens if t in vals]
            bars = ax.bar(xs, ys, width=width, color=colour_of(impl, extra))
            legend.setdefault(impl, bars)
        ax.set_xticks(range(len(tokens)), [tokens_label(t) for t in tokens])
        ax.set_title(SHAPE_TITLES.get(shape, shape), fontsize=10)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("extra peak memory, GiB")
        ax.grid(True, axis="y", alpha=0.35)
    return _finish(fig, f"Expert layer, {mode}: extra peak memory above weights and inputs (lower is better)", env,
                   list(legend.values()), list(legend.keys()), path)


# ---------------------------------------------------------------------------------------------- end to end
def _gib_label(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _bar_panel(ax, rows: list[dict], key: str, ylabel: str, title: str, extra: dict[str, str], fmt,
               ratio_to: float | None = None, higher_is_better: bool = True) -> None:
    labels = [r["impl"] for r in rows]
    vals = [r[key] for r in rows]
    ax.bar(range(len(rows)), vals, color=[colour_of(lab, extra) for lab in labels])
    for i, (lab, v) in enumerate(zip(labels, vals)):
        text = fmt(v)
        if ratio_to and "nf4moe" not in lab and v:
            r = ratio_to / v if higher_is_better else v / ratio_to
            text += f"\nnf4moe {r:.2f}x {'faster' if higher_is_better else 'less'}"
        ax.annotate(text, (i, v), ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), [lab.replace(" + ", "\n+ ").replace(" (", "\n(") for lab in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.35)
    ax.set_ylim(0, max(vals) * 1.25 if vals else 1)


def _full_panel(ax, rows: list[dict], budget: float | None) -> None:
    """Peak memory of the full-model step, stacked: NF4 experts, other weights, everything the step adds."""
    xs = range(len(rows))
    parts = []
    for r in rows:
        x = r.get("extra") or {}
        experts, weights = x.get("nf4_experts_gib"), r.get("weights_gib")
        if experts is None or weights is None:
            parts.append((0.0, 0.0, r["peak_mem_gib"]))
        else:
            parts.append((experts, weights - experts, r["peak_mem_gib"] - weights))
    stack = (("NF4 experts", "#2ca02c"),
             ("other weights (4-bit attention, bf16 embeddings, head)", "#98df8a"),
             ("step: LoRA + grads + 8-bit Adam states, activations, logits", "#c7c7c7"))
    bottom = [0.0] * len(rows)
    for k, (label, colour) in enumerate(stack):
        vals = [p[k] for p in parts]
        ax.bar(xs, vals, bottom=bottom, color=colour, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(rows):
        ax.annotate(f"{_gib_label(r['peak_mem_gib'])} GiB", (i, r["peak_mem_gib"]), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    top = max([r["peak_mem_gib"] for r in rows] + ([budget] if budget else []))
    if budget:
        ax.axhline(budget, color="black", linestyle="--", linewidth=1.2)
        ax.text(0.98, budget, f"budget {budget:g} GiB", transform=ax.get_yaxis_transform(), ha="right",
                va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.45)
    ax.set_xticks(list(xs), [r["impl"].replace(", ", "\n") for r in rows], fontsize=8)
    ax.set_ylabel("peak memory, GiB")
    cfg = rows[0]
    ax.set_title(f"Full model, {cfg.get('layers', '?')} layers, seq {cfg.get('seq', '?')}: peak of a training step",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=7.5, frameon=False)
    ax.grid(True, axis="y", alpha=0.35)


def plot_e2e(doc: dict, path: Path) -> Path:
    """Reduced depth: tokens/s and peak memory per implementation; full model: peak memory vs the budget."""
    rows = [r for r in doc["rows"] if r.get("status", "ok") == "ok"]
    reduced = [r for r in rows if r["part"] == "reduced"]
    full = [r for r in rows if r["part"] == "full"]
    panels = (2 if reduced else 0) + (1 if full else 0)
    if panels == 0:
        raise ValueError("e2e JSON holds no successful rows to plot")
    fig, axes = _grid(panels, width=5.6, height=4.8)
    extra: dict[str, str] = {}
    ax_iter = iter(axes)
    if reduced:
        cfg = reduced[0]
        what = f"{cfg.get('layers', '?')} layers, seq {cfg.get('seq', '?')}, LoRA r={cfg.get('rank', '?')}"
        ours = next((r for r in reduced if "nf4moe" in r["impl"]), None)
        _bar_panel(next(ax_iter), reduced, "tokens_per_s", "training tokens/s",
                   f"Throughput, {what} (higher is better)", extra, lambda v: f"{v:,.0f}",
                   ratio_to=ours["tokens_per_s"] if ours else None)
        _bar_panel(next(ax_iter), reduced, "peak_mem_gib", "peak memory, GiB",
                   f"Peak memory, {what} (lower is better)", extra, _gib_label,
                   ratio_to=ours["peak_mem_gib"] if ours else None, higher_is_better=False)
    if full:
        _full_panel(next(ax_iter), full, doc.get("budget_gib"))
    title = doc.get("title", "End-to-end QLoRA training step")
    return _finish(fig, title, doc.get("env", {}), [], [], path)


# ---------------------------------------------------------------------------------------------- driver
def is_layer_row(r: dict) -> bool:
    return all(k in r for k in ("shape", "mode", "tokens", "impl", "ms"))


def plot_file(path: Path, out: Path) -> list[Path]:
    with open(path) as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark results file (no 'rows' list)")
    stem = path.stem
    written = []
    if doc.get("kind") == "e2e":
        written.append(plot_e2e(doc, out / f"{stem}_e2e.png"))
        return written
    rows = [r for r in doc["rows"] if is_layer_row(r)]
    if not rows:
        raise ValueError(f"{path}: no layer rows (shape, mode, tokens, impl, ms)")
    env = doc.get("env", {})
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mr = [r for r in rows if r["mode"] == mode]
        written.append(plot_layer_time(mr, env, mode, out / f"{stem}_{mode}_time.png"))
        mem = [r for r in mr if r.get("extra_mem_gib") is not None]
        if mem:
            written.append(plot_layer_memory(mem, env, mode, out / f"{stem}_{mode}_memory.png"))
    return written


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nf4moe plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="benchmark JSON files or folders of them (default: bench/results/)")
    ap.add_argument("--out", default=None, help="folder for the PNG files (default: bench/plots/)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("nf4moe plot needs matplotlib, an optional dependency: pip install nf4moe[plot]") from None
    inputs = [Path(p) for p in args.inputs] or [_checkout_bench() / "results"]
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"nf4moe plot: {p} does not exist")
    if not files:
        raise SystemExit(f"nf4moe plot: no JSON files in {', '.join(map(str, inputs))}")
    out = Path(args.out) if args.out else _checkout_bench() / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        for png in plot_file(f, out):
            print(f"wrote {png}")
    return 0
