"""The README's supported-model table is generated from the adapter table; it must not drift from it."""
from __future__ import annotations

import re
from pathlib import Path

import transformers

from nf4moe.adapters import supported_models

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./run demo", "./run tests"]
    assert "./run tests" in (README.parent / ".ci" / "run").read_text()


def test_supported_model_table_matches_the_adapter_table():
    block = README.read_text().split("<!-- models:start -->")[1].split("<!-- models:end -->")[0]
    rows = [line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    listed = {(r[0].strip(), r[1].strip()): r[3].strip() == "yes" for r in rows[1:]}
    live = {(r["model_type"], r["experts_class"]): r["supported"] for r in supported_models()}
    generated_with = re.search(r"Expert classes of transformers (\S+) ", block).group(1)
    if generated_with == transformers.__version__:  # the README's own version: the whole table, exactly
        assert listed == live
        return
    # Another transformers (CI installs the newest release, the GPU image has 5.17): it may add or drop classes,
    # and a release may change one class's interface (5.25's BailingHybridExperts gained its own _apply_gate);
    # most classes both know of must still agree.
    common = set(listed) & set(live)
    assert len(common) >= 0.8 * len(listed)
    differ = sorted(k for k in common if listed[k] != live[k])
    assert len(differ) <= 0.05 * len(common), (generated_with, transformers.__version__, differ)
    for family in ("qwen3_moe", "glm4_moe", "deepseek_v3", "mixtral", "qwen2_moe", "olmoe"):
        assert any(k[0] == family and v for k, v in listed.items()), family
