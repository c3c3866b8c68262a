"""Atomic saves, checked by fault injection at every file boundary of every writer, and the loader's refusals.

A boundary is one call that touches the disk: a safetensors or JSON file written, an fsync, a
rename, a hard link.  The list is recorded from a real save (so a new step in a writer is a new
case without editing this file).  Per boundary: the step raises (disk full) -> the save raises and
the previous checkpoint is bit-identical and loads; the process dies there (no cleanup runs) ->
the directory is old or new, whole, or (killed between the two renames) the loader says where the
old one is and the next save restores it; the step writes a short file -> the save refuses it.
Then the loader: missing, truncated, altered and partial directories, checkpoints older than the
manifest, corrupt safetensors, config/tensor disagreements, local paths that do not exist.
Tiny packaged Qwen3-MoE config with one layer, bf16, LoRA r=2: a save or load takes milliseconds.
"""
from __future__ import annotations

import builtins
import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from functools import lru_cache

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils

import nf4moe
from nf4moe.adapters import atomic
from nf4moe.adapters import LegacyCheckpointWarning
from nf4moe.adapters.atomic import MANIFEST_NAME
from nf4moe.adapters.replace import quant_experts
from nf4moe.finetune import load_config, random_model

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="boundaries are named via /proc/self/fd")

TARGET = "ckpt"
FOREIGN = "tokenizer.json"  # a user's file in the checkpoint directory: every save must keep it


class Injected(OSError):
    """The fault a patched step raises (as a full disk would)."""


class Killed(BaseException):
    """The process dies at the step: no handler of the writer's may catch it (and no cleanup runs, see below)."""


# ---------------------------------------------------------------------------------------------- models, writers
@lru_cache(maxsize=None)
def tiny(seed: int):
    cfg = load_config()
    cfg.num_hidden_layers = 1
    model = nf4moe.replace_experts(random_model(cfg, seed=seed, dtype=torch.bfloat16), lora_rank=2, backend="reference")
    with torch.no_grad():
        for _, qe in quant_experts(model):
            for p in list(qe.lora_A.values()) + list(qe.lora_B.values()):
                p.normal_(0, 0.05)
    return model


def lora_of(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_back(writer: str, directory) -> dict[str, torch.Tensor]:
    """What ``writer`` wrote, read back by its loader."""
    if writer == "save_pretrained":
        return nf4moe.from_pretrained(directory, backend="reference").state_dict()
    model = copy.deepcopy(tiny(2))
    nf4moe.load_adapter(model, directory)
    return lora_of(model)


def content(writer: str, model) -> dict[str, torch.Tensor]:
    return model.state_dict() if writer == "save_pretrained" else lora_of(model)


WRITERS = {
    "save_pretrained": lambda model, d: nf4moe.save_pretrained(model, d, max_shard_size="100KB"),  # 4 shards + index
    "save_adapter": nf4moe.save_adapter,
}


def snapshot(directory) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def old_checkpoint(writer: str, root) -> str:
    """``root/ckpt`` holding the writer's checkpoint of tiny(0), plus a user file and folder beside it."""
    target = os.path.join(root, TARGET)
    WRITERS[writer](tiny(0), target)
    with open(os.path.join(target, FOREIGN), "w") as fh:
        fh.write('{"user": "file"}')
    os.makedirs(os.path.join(target, "notes"))
    with open(os.path.join(target, "notes", "a.txt"), "w") as fh:
        fh.write("kept")
    return target


def leftovers(root) -> list[str]:
    return sorted(e for e in os.listdir(root) if e != TARGET)


# ---------------------------------------------------------------------------------------------- fault injection
class Faults:
    """Patch every disk step of a save; count the steps; at step ``at`` raise, or cut the written file short."""

    def __init__(self, root: str, at: int | None = None, mode: str = "raise"):
        self.root, self.at, self.mode, self.steps = root, at, mode, []
        self.exc = Killed if mode == "kill" else Injected

    def label(self, op: str, *paths: str) -> str:
        rel = [re.sub(r"nf4moe-tmp-[0-9a-f]+", "nf4moe-tmp", os.path.relpath(p, self.root)) for p in paths]
        return f"{op} {' -> '.join(rel)}"

    def step(self, op: str, *paths: str) -> bool:
        """Record a step; raise if it is the chosen one in raise mode; True if it is the one to cut short."""
        self.steps.append(self.label(op, *paths))
        chosen = len(self.steps) - 1 == self.at
        if chosen and self.mode != "short":
            raise self.exc(28, f"injected fault at {self.steps[-1]}")
        return chosen and op == "write"

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_save, real_open, real_fsync = safetensors.torch.save_file, builtins.open, os.fsync
        real_rename, real_link = os.rename, os.link
        faults = self

        def save_file_(tensors, filename, metadata=None):
            short = faults.step("write", filename)
            real_save(tensors, filename, metadata=metadata)
            if short:
                os.truncate(filename, os.path.getsize(filename) // 2)

        def open_(file, mode="r", *args, **kwargs):
            if not isinstance(file, (str, os.PathLike)) or not set(mode) & set("wax+"):
                return real_open(file, mode, *args, **kwargs)
            short = faults.step("write", os.fspath(file))
            fh = real_open(file, mode, *args, **kwargs)
            return ShortFile(fh, os.fspath(file)) if short else fh

        def fsync_(fd):
            faults.step("fsync", os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def rename_(src, dst, *args, **kwargs):
            faults.step("rename", os.fspath(src), os.fspath(dst))
            return real_rename(src, dst, *args, **kwargs)

        def link_(src, dst, *args, **kwargs):
            faults.step("link", os.fspath(dst))
            return real_link(src, dst, *args, **kwargs)

        mp.setattr(safetensors.torch, "save_file", save_file_)
        mp.setattr(transformers.modeling_utils, "safe_save_file", save_file_)  # model.save_pretrained's writer
        mp.setattr(builtins, "open", open_)
        mp.setattr(os, "fsync", fsync_)
        mp.setattr(os, "rename", rename_)
        mp.setattr(os, "link", link_)


class ShortFile:
    """A file object that, once closed, loses the second half of what was written (a short write)."""

    def __init__(self, fh, path: str):
        self._fh, self._path = fh, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._fh.close()
        os.truncate(self._path, os.path.getsize(self._path) // 2)

    def __getattr__(self, name):
        return getattr(self._fh, name)


@lru_cache(maxsize=None)
def boundaries(writer: str) -> tuple[str, ...]:
    """Every disk step of ``writer`` saving tiny(1) over an existing checkpoint, as recorded."""
    with tempfile.TemporaryDirectory() as root:
        target = old_checkpoint(writer, root)
        faults = Faults(root)
        with pytest.MonkeyPatch.context() as mp:
            faults.install(mp)
            WRITERS[writer](tiny(1), target)
    return tuple(faults.steps)


def commit_step(writer: str) -> int:
    """Index of the rename that puts the new directory in place: from there on the new one is the checkpoint."""
    return next(i for i, s in enumerate(boundaries(writer)) if s.startswith("rename ") and s.endswith(f"-> {TARGET}")
                and "nf4moe-tmp" in s)


CASES = [pytest.param(w, i, id=f"{w}-{i}-{s}") for w in WRITERS for i, s in enumerate(boundaries(w))]
WRITES = [pytest.param(w, i, id=f"{w}-{s}") for w in WRITERS for i, s in enumerate(boundaries(w))
          if s.startswith("write ")]


def test_boundaries_cover_every_step():
    for writer in WRITERS:
        steps = boundaries(writer)
        written = {s.split("/")[-1] for s in steps if s.startswith("write ")}
        assert MANIFEST_NAME in written and any(n.endswith(".safetensors") for n in written), steps
        assert written >= ({"config.json", "generation_config.json", "model.safetensors.index.json"}
                           if writer == "save_pretrained" else {"adapter_config.json"}), steps
        # the manifest is written after every other file, the swap is two renames, the user's files are linked
        assert max(i for i, s in enumerate(steps) if s.startswith("write ")) == steps.index(
            f"write .{TARGET}.nf4moe-tmp/{MANIFEST_NAME}")
        assert sum(s.startswith("rename ") for s in steps) == 2
        assert any(s.startswith("link ") and FOREIGN in s for s in steps)


@pytest.mark.parametrize("writer,at", CASES)
def test_failure_at_each_boundary_keeps_the_old_checkpoint(writer, at, tmp_path, monkeypatch):
    target = old_checkpoint(writer, tmp_path)
    before = snapshot(target)
    faults = Faults(str(tmp_path), at)
    with monkeypatch.context() as mp:
        faults.install(mp)
        if boundaries(writer)[at].startswith("link "):  # a failed hard link falls back to a copy: the save goes on
            WRITERS[writer](tiny(1), target)
            assert snapshot(target)["notes/a.txt" if "notes" in boundaries(writer)[at] else FOREIGN] == before[
                "notes/a.txt" if "notes" in boundaries(writer)[at] else FOREIGN]
            assert_same(load_back(writer, target), content(writer, tiny(1)))
            return
        with pytest.raises(Injected):
            WRITERS[writer](tiny(1), target)
    if at <= commit_step(writer):  # a failed second rename is rolled back
        assert snapshot(target) == before
        assert_same(load_back(writer, target), content(writer, tiny(0)))
        assert leftovers(tmp_path) == []
    else:  # the new directory was in place when the step failed (the final fsync): it is whole
        assert_same(load_back(writer, target), content(writer, tiny(1)))
        assert snapshot(target)[FOREIGN] == before[FOREIGN]


@pytest.mark.parametrize("writer,at", CASES)
def test_kill_at_each_boundary_leaves_old_or_new_whole(writer, at, tmp_path, monkeypatch):
    target = old_checkpoint(writer, tmp_path)
    before = snapshot(target)
    faults = Faults(str(tmp_path), at, mode="kill")
    with monkeypatch.context() as mp:
        faults.install(mp)
        mp.setattr(atomic, "_rollback", lambda *a: None)  # a killed process cleans nothing up
        mp.setattr(atomic, "_discard", lambda *a: None)
        with pytest.raises(Killed):
            WRITERS[writer](tiny(1), target)
    interrupted = not os.path.exists(target)
    if interrupted:  # killed between the two renames
        assert faults.steps[at].startswith("rename ") and at == commit_step(writer)
        with pytest.raises(FileNotFoundError, match=r"interrupted.*\.ckpt\.nf4moe-old is that previous checkpoint"):
            load_back(writer, target)
    elif at < commit_step(writer):
        assert snapshot(target) == before
        assert_same(load_back(writer, target), content(writer, tiny(0)))
    else:
        assert_same(load_back(writer, target), content(writer, tiny(1)))
    # The next save cleans up what the kill left and restores a set-aside checkpoint first.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WRITERS[writer](tiny(2), target)
    assert any("was interrupted" in str(w.message) for w in caught) == interrupted
    assert_same(load_back(writer, target), content(writer, tiny(2)))
    assert snapshot(target)[FOREIGN] == before[FOREIGN]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("writer,at", WRITES)
def test_short_write_of_each_file_is_refused_before_the_swap(writer, at, tmp_path, monkeypatch):
    target = old_checkpoint(writer, tmp_path)
    before = snapshot(target)
    name = boundaries(writer)[at].rsplit("/", 1)[-1]
    faults = Faults(str(tmp_path), at, mode="short")
    with monkeypatch.context() as mp:
        faults.install(mp)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: truncated"):
            WRITERS[writer](tiny(1), target)
    assert snapshot(target) == before
    assert_same(load_back(writer, target), content(writer, tiny(0)))
    assert leftovers(tmp_path) == []


def test_first_save_that_fails_leaves_nothing(tmp_path, monkeypatch):
    faults = Faults(str(tmp_path), 0)
    with monkeypatch.context() as mp:
        faults.install(mp)
        with pytest.raises(Injected):
            nf4moe.save_pretrained(tiny(1), tmp_path / TARGET)
    assert os.listdir(tmp_path) == []


def test_save_keeps_user_files_and_drops_stale_shards(tmp_path):
    target = old_checkpoint("save_pretrained", tmp_path)
    nf4moe.save_pretrained(tiny(1), target)  # one shard now, where there were four
    files = snapshot(target)
    assert sorted(files) == sorted(["config.json", "generation_config.json", "model.safetensors", MANIFEST_NAME,
                                    FOREIGN, "notes/a.txt"])
    assert files["notes/a.txt"] == b"kept"
    assert_same(load_back("save_pretrained", target), content("save_pretrained", tiny(1)))


# ---------------------------------------------------------------------------------------------- the loader
def saved(writer: str, root) -> tuple[str, list[str]]:
    target = os.path.join(root, TARGET)
    WRITERS[writer](tiny(1), target)
    with open(os.path.join(target, MANIFEST_NAME)) as fh:
        return target, sorted(json.load(fh)["files"])


FILES = [pytest.param(w, n, id=f"{w}-{n}") for w in WRITERS for n in
         ((["config.json", "generation_config.json", "model.safetensors.index.json"]
           + [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]) if w == "save_pretrained"
          else ["adapter_config.json", "adapter_model.safetensors"])]


@pytest.mark.parametrize("writer,name", FILES)
def test_truncated_missing_or_altered_file_is_refused_naming_it(writer, name, tmp_path):
    target, listed = saved(writer, tmp_path)
    assert name in listed
    path = os.path.join(target, name)
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"not the complete checkpoint.*{re.escape(name)} has \d+ bytes, the "
                                         rf"manifest {len(data)} \(truncated\)"):
        load_back(writer, target)
    with open(path, "wb") as fh:  # same size, one byte changed
        fh.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: sha256 differs from the manifest"):
        load_back(writer, target)
    os.remove(path)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} is missing"):
        load_back(writer, target)


@pytest.mark.parametrize("writer", WRITERS)
def test_truncated_manifest_is_refused(writer, tmp_path):
    target, _ = saved(writer, tmp_path)
    path = os.path.join(target, MANIFEST_NAME)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME}: truncated or corrupt JSON"):
        load_back(writer, target)


def test_partial_directory_without_its_manifest_is_refused(tmp_path):
    target, _ = saved("save_pretrained", tmp_path)
    os.remove(os.path.join(target, MANIFEST_NAME))
    with pytest.raises(ValueError, match=rf"partial checkpoint: its config.json says .* wrote {MANIFEST_NAME} last"):
        load_back("save_pretrained", target)


def as_plain_save(target: str, edit=None) -> None:
    """Make ``target`` look written by model.save_pretrained: no manifest, config.json promising none
    (``edit`` changes its quantization_config)."""
    os.remove(os.path.join(target, MANIFEST_NAME))
    path = os.path.join(target, "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    del cfg["quantization_config"]["manifest"]
    if edit:
        edit(cfg["quantization_config"])
    with open(path, "w") as fh:
        json.dump(cfg, fh)


def test_checkpoint_without_manifest_loads_when_its_index_is_complete(tmp_path):
    target, _ = saved("save_pretrained", tmp_path)
    as_plain_save(target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyCheckpointWarning)  # transformers' own format: no warning
        assert_same(load_back("save_pretrained", target), content("save_pretrained", tiny(1)))
    shard = os.path.join(target, "model-00003-of-00004.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 10)
    with pytest.raises(ValueError, match=r"model-00003-of-00004.safetensors: truncated safetensors file"):
        load_back("save_pretrained", target)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=r"partial checkpoint: .* 1 are missing: \['model-00003-of-00004"):
        load_back("save_pretrained", target)


def test_older_nf4moe_section_format_still_loads_with_a_warning(tmp_path):
    """Before the quantizer, nf4moe wrote the state_dict as is (tied weights as aliases) and an ``nf4moe`` section."""
    model = tiny(1)
    target = str(tmp_path / "old")
    os.makedirs(target)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    aliases = {}
    if model.config.tie_word_embeddings:
        aliases = {"lm_head.weight": "model.embed_tokens.weight"}
        del sd["lm_head.weight"]
    safetensors.torch.save_file(sd, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    table = cfg.pop("quantization_config")["quantized_modules"]
    cfg["nf4moe"] = {"format_version": 1, "model_class": type(model).__name__, "modules": table, "aliases": aliases}
    with open(os.path.join(target, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.warns(LegacyCheckpointWarning, match="no nf4moe_manifest.json.*1 safetensors files, all present"):
        restored = nf4moe.from_pretrained(target, backend="reference")
    assert_same(restored.state_dict(), model.state_dict())
    assert restored.hf_quantizer is not None, "a loaded model saves in the current format"


@pytest.mark.parametrize("garbage,what", [
    pytest.param(b"", "truncated", id="empty"),
    pytest.param((16).to_bytes(8, "little") + b"{not json}xxxxxx", "corrupt", id="bad-header"),
    pytest.param(b"\xfe" * 8 + b"not safetensors at all", "truncated or corrupt", id="not-safetensors"),
])
def test_garbage_safetensors_named_as_truncated_or_corrupt(garbage, what, tmp_path):
    target, _ = saved("save_pretrained", tmp_path)
    as_plain_save(target)
    shard = os.path.join(target, "model-00001-of-00004.safetensors")
    with open(shard, "wb") as fh:
        fh.write(garbage)
    with pytest.raises(ValueError, match=rf"model-00001-of-00004.safetensors: {what}"):
        load_back("save_pretrained", target)
    adapter, _ = saved("save_adapter", tmp_path / "a")
    os.remove(os.path.join(adapter, MANIFEST_NAME))  # as PEFT writes it: no manifest, only the header check
    with open(os.path.join(adapter, "adapter_model.safetensors"), "wb") as fh:
        fh.write(garbage)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: {what}"):
        load_back("save_adapter", adapter)


def test_config_rank_disagreeing_with_tensors_is_refused(tmp_path):
    target, _ = saved("save_pretrained", tmp_path)

    def rank_4(qconfig):
        for entry in qconfig["quantized_modules"].values():
            entry["lora_rank"] = 4

    as_plain_save(target, rank_4)
    # transformers >= 5.2x refuses the shape mismatch itself (RuntimeError after its load report); where it
    # leaves shapes to the quantizer, nf4moe names the tensor and both shapes.
    with pytest.raises((RuntimeError, ValueError), match=r"ignore_mismatched_sizes|'model\.layers\.0\.mlp\.experts"
                                                          r"\.lora_A\.\w+' is \(8, 2, 128\) .* the module table gives "
                                                          r"\(8, 4, 128\)"):
        load_back("save_pretrained", target)


# ---------------------------------------------------------------------------------------------- local paths
@pytest.fixture
def no_hub(monkeypatch):
    """Any call that would reach transformers' config loader (and so the Hub client) fails the test."""
    import transformers

    def reached(*a, **k):
        raise AssertionError(f"reached AutoConfig.from_pretrained with {a}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", reached)


@pytest.mark.parametrize("path", ["{tmp}/missing", "./no-such-checkpoint", "../no-such-checkpoint",
                                  "{tmp}/sub/missing"])
def test_missing_local_path_fails_before_the_hub(path, tmp_path, no_hub, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    path = path.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"name_or_path {re.escape(repr(path))} does not exist"):
        nf4moe.from_pretrained(path)


def test_path_under_an_existing_directory_is_local_and_says_so(tmp_path, no_hub, monkeypatch):
    (tmp_path / "org").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'org/model' does not exist \(its parent 'org' is a local directory"):
        nf4moe.from_pretrained("org/model")


def test_file_and_directory_without_config_are_refused(tmp_path, no_hub):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.safetensors' is a file"):
        nf4moe.from_pretrained(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))} has no config.json"):
        nf4moe.from_pretrained(tmp_path)


def test_hub_like_id_still_reaches_the_hub(tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(
        LookupError("hub reached")))
    with pytest.raises(LookupError, match="hub reached"):
        nf4moe.from_pretrained("some-org/some-model")


def test_adapter_dir_missing_or_corrupt_config_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_dir .*nope' is not a directory"):
        nf4moe.load_adapter(tiny(2), tmp_path / "nope")
    adapter, _ = saved("save_adapter", tmp_path)
    os.remove(os.path.join(adapter, MANIFEST_NAME))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as fh:
        fh.write('{"r": 2, "lora_al')
    with pytest.raises(ValueError, match="adapter_config.json: truncated or corrupt JSON"):
        load_back("save_adapter", adapter)


def test_stale_aside_copy_is_ignored_by_loaders_and_removed_by_the_next_save(tmp_path):
    target, _ = saved("save_pretrained", tmp_path)
    shutil.copytree(target, tmp_path / f".{TARGET}.nf4moe-old")  # killed after the new one was in place
    assert_same(load_back("save_pretrained", target), content("save_pretrained", tiny(1)))
    nf4moe.save_pretrained(tiny(0), target)
    assert leftovers(tmp_path) == []
    assert_same(load_back("save_pretrained", target), content("save_pretrained", tiny(0)))

