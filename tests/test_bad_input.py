"""Bad input as users meet it, through the command line: every mistake in a config, a data folder,
a checkpoint or a run directory stops the command with exit code 2 and exactly one line on stderr
that names the key or file at fault, never a traceback, and never PyTorch's advice to load a file
unsafely. Unusual but valid images (CMYK, 16-bit, RGBA, palette, mixed modes and sizes) work.

Each case fails before any training: the config cases in the parser, the data cases while the
splits are built, the checkpoint cases when the file is opened.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.config.stages import resolve_stages
from noisystudent.data.splits import build_splits
from noisystudent.data.transforms import eval_transform, train_transform
from noisystudent.models.checkpoint import save_model
from noisystudent.models.factory import create_model
from noisystudent.models.preflight import check_pretrained_files
from noisystudent.runtime.errors import CheckpointError
from noisystudent.runtime.rundir import RunDir
from test_data import folder_cfg, folders, make_folder  # noqa: F401 - folders is a fixture


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # writes what the case needs under the folder; returns argv
    expected: str  # in the one error line; {r} is the case's folder


def _file(rel: str, text: str | bytes) -> Callable[[Path], Path]:
    def write(r: Path) -> Path:
        p = r / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return p
    return write


def _run_with(*sets: str) -> Callable[[Path], list[str]]:
    return lambda r: ["run", "--out", str(r / "run"), "--quiet", *[a for s in sets for a in ("--set", s)]]


def _run_config(text: str, name: str = "cfg.yaml") -> Callable[[Path], list[str]]:
    return lambda r: ["run", str(_file(name, text)(r)), "--out", str(r / "run"), "--quiet"]


def _made_run(r: Path) -> Path:
    """A run directory as `noisystudent run` starts one (its real writer)."""
    run = r / "made"
    RunDir.open(run, load_config(None), resume=False).release_lock()
    return run


def _torch_file(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _checkpoint(r: Path, name: str) -> Path:
    """A real checkpoint, as the pipeline writes it."""
    path = r / name
    save_model(path, create_model("ns_cnn_s", 10, 1), name="ns_cnn_s", num_classes=10, in_chans=1,
               classes=[str(i) for i in range(10)], image_size=16, mean=(0.5,), std=(0.2,))
    return path


def _cut(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _label(ckpt: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def argv(r: Path) -> list[str]:
        (r / "pool").mkdir(exist_ok=True)
        return ["label", str(ckpt(r)), str(r / "pool"), "--out", str(r / "store"), "--quiet"]
    return argv


GARBAGE = bytes(range(128, 256)) * 4  # starts like a pickle (0x80), is none: torch warns, then fails


class _RunsCode:
    """Unpickling this would call os.system: torch (weights_only) refuses it as a blocked GLOBAL."""

    def __reduce__(self):
        return (os.system, ("echo never run",))


def _bad_manifest(manifest: object) -> Callable[[Path], list[str]]:
    """A run directory whose manifest.json (its real writer's) was replaced by ``manifest``."""
    def argv(r: Path) -> list[str]:
        run = _made_run(r)
        (run / "manifest.json").write_text(json.dumps(manifest))
        return ["run", "--resume", str(run), "--quiet"]
    return argv

CASES = [
    # --- config
    Case("unknown key", _run_with("train.epoch=3"), "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    Case("unknown key in a file", _run_config("train:\n  epoch: 3\n"), "unknown config key 'train.epoch'"),
    Case("wrong type", _run_with("train.batch_size=many"),
         "config key 'train.batch_size' must be an integer, got 'many'"),
    Case("wrong type of section", _run_with("train=5"), "config key 'train' must be a mapping, got 5"),
    Case("invalid YAML", _run_config("train: [1,\n", "bad.yaml"), "{r}/bad.yaml: not valid YAML ("),
    Case("YAML that is not a mapping", _run_config("- a\n- b\n", "list.yaml"),
         "{r}/list.yaml: config must be a mapping of keys to values"),
    Case("NaN", _run_with("pseudo.threshold=.nan"), "config key 'pseudo.threshold' must be a finite number, got nan"),
    Case("infinity", _run_with("train.lr=.inf"), "config key 'train.lr' must be a finite number, got inf"),
    Case("NaN in a file", _run_config("pseudo:\n  threshold: .nan\n"),
         "config key 'pseudo.threshold' must be a finite number, got nan"),
    Case("-infinity in a list", _run_with("evaluate.fgsm_eps=[0, -.inf]"),
         "config key 'evaluate.fgsm_eps[1]' must be a finite number, got -inf"),
    # --- keys that name a registry entry: checked with the config (REGISTRY_CASES: `config` too)
    *[Case(name, _run_with(setting), expected) for name, setting, expected in [
        ("unknown optimizer", "train.optimizer=adamx",
         "config key 'train.optimizer': unknown optimizer 'adamx' (did you mean 'adamax'?)"),
        ("unknown scheduler", "train.scheduler=linear", "config key 'train.scheduler' must be one of cosine, step"),
        ("unknown teacher model", "teacher.model=resnet_bogus", "config key 'teacher.model': unknown model "
         "'resnet_bogus'; see `noisystudent models`"),
        ("unknown student model", "students.1.model=ns_cnn_xl", "config key 'students[1].model': unknown model"),
        ("unknown device", "device=bogus", "config key 'device': 'bogus' is not a device torch knows"),
        ("malformed device", "device=cuda:x", "config key 'device': 'cuda:x' is not a device torch knows"),
    ]],
    # --- run directories
    Case("resume: the config passed again is missing",
         lambda r: ["run", "--resume", str(_made_run(r)), str(r / "missing.yaml"), "--quiet"],
         "config file not found: {r}/missing.yaml"),
    Case("resume: a folder that is no run", lambda r: ["run", "--resume", str(_file("other/x.txt", "x")(r).parent)],
         "--resume: {r}/other has no config.yaml; is it a run directory?"),
    Case("resume: no such folder", lambda r: ["run", "--resume", str(r / "nope")],
         "--resume: run directory not found: {r}/nope"),
    Case("resume: another config", lambda r: ["run", "--resume", str(_made_run(r)), "--set", "seed=7", "--quiet"],
         "--resume: {r}/made was made by a different config"),
    Case("resume: a manifest of another shape", _bad_manifest([]),
         "corrupt run manifest {r}/made/manifest.json (a JSON list, not an object); restore it"),
    Case("resume: a manifest with a wrong type", _bad_manifest({"fingerprint": 5, "stages": {}}),
         "corrupt run manifest {r}/made/manifest.json ('fingerprint' is not a string)"),
    Case("resume: a manifest whose stages are a list", _bad_manifest({"fingerprint": "x", "stages": []}),
         "corrupt run manifest {r}/made/manifest.json ('stages' is not an object)"),
    Case("--out: a folder of other files, no manifest", lambda r: [
        *_run_with()(r)[:1], "--out", str(_file("run/mine.txt", "my notes")(r).parent), "--quiet"],
         "run directory {r}/run is not empty and holds no run (no manifest.json; it has mine.txt); choose a new "
         "--out folder or empty this one"),
    # --- checkpoints
    Case("garbage checkpoint", _label(_file("garbage.pt", GARBAGE)),
         "not a noisystudent checkpoint: {r}/garbage.pt (not a file written by torch.save)"),
    Case("empty checkpoint", _label(_file("empty.pt", b"")), "not a noisystudent checkpoint: {r}/empty.pt (empty file)"),
    Case("text file as checkpoint", _label(_file("notes.pt", "just some notes\n")),
         "not a noisystudent checkpoint: {r}/notes.pt (not a file written by torch.save)"),
    Case("truncated checkpoint", _label(lambda r: _cut(_checkpoint(r, "cut.pt"))),
         "damaged noisystudent checkpoint: {r}/cut.pt (truncated or corrupt PyTorch file"),
    Case("checkpoint holding Python objects", _label(lambda r: _file("obj.pt", _torch_file({"x": io.BytesIO}))(r)),
         "not a noisystudent checkpoint: {r}/obj.pt (it holds Python objects, such as _io.BytesIO, besides "
         "tensors; they are not loaded, since loading them could run code)"),
    Case("checkpoint whose pickle would run code", _label(lambda r: _file("evil.pt", _torch_file(
        {"model": _RunsCode()}))(r)), f"not a noisystudent checkpoint: {{r}}/evil.pt (it holds Python objects, "
         f"such as {os.system.__module__}.system, besides tensors; they are not loaded"),
    Case("another kind of PyTorch file", _label(lambda r: _file("sd.pt", _torch_file({"w": torch.zeros(2)}))(r)),
         "not a noisystudent checkpoint: {r}/sd.pt (it lacks the 'model' and 'state_dict' entries"),
    Case("missing checkpoint", _label(lambda r: r / "absent.pt"), "checkpoint not found: {r}/absent.pt"),
    Case("garbage pretrained file", lambda r: _run_with(f"teacher.pretrained={_file('w.pt', GARBAGE)(r)}")(r),
         "not a weight file: {r}/w.pt (not a file written by torch.save)"),
    Case("evaluate a garbage checkpoint", lambda r: ["evaluate", str(_file("g.pt", GARBAGE)(r)), "--quiet"],
         "not a noisystudent checkpoint: {r}/g.pt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_key_or_file(tmp_path, capsys, case):
    argv = case.setup(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("noisystudent: error: ")
    assert case.expected.format(r=tmp_path) in err[0]
    assert "Traceback" not in err[0] and "weights_only" not in err[0]
    assert not (tmp_path / "run" / "teacher").exists()  # nothing trained


@pytest.mark.parametrize("setting", ["train.optimizer=adamx", "teacher.model=resnet_bogus", "device=bogus",
                                     "train.scheduler=linear"])
def test_noisystudent_config_refuses_registry_names_as_run_does(capsys, setting):
    """A key naming a registry entry is checked with the config, so `noisystudent config` (which
    creates no run directory) refuses it with the same line as `run`."""
    assert main(["config", "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = setting.split("=")[0]
    assert len(err) == 1 and err[0].startswith(f"noisystudent: error: config key '{key}'"), err


def test_lookahead_optimizers_and_paper_model_aliases_are_accepted():
    """What timm's factories accept passes: a lookahead_ prefix, any case, the paper's B7 alias."""
    cfg = load_config(None, ["train.optimizer=lookahead_AdamW", "students.0.model=B7", "device=cpu"])
    assert cfg.train.optimizer == "lookahead_AdamW" and cfg.students[0].model == "B7"


def test_run_out_never_touches_a_folder_of_files_it_did_not_write(tmp_path, capsys):
    """A folder with a run's files but no manifest.json (copied, or its manifest lost) is refused
    before anything is written: the user's files and the old model stay as they were."""
    out = tmp_path / "out"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "model.pt").write_bytes(b"an old model")
    (out / "teacher" / "notes.txt").write_text("mine")
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    for argv in (["run", "--out", str(out), "--quiet"], ["train", str(out), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"noisystudent: error: run directory {out} is not empty and holds no run (no manifest.json; "
                       "it has teacher); choose a new --out folder or empty this one"]
        assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before


def test_garbage_checkpoint_in_a_real_process_prints_one_line(tmp_path):
    """In a process of its own, where nothing (pytest) captures warnings: torch's warning about
    the file's pickle protocol must not reach the user either."""
    bad = _file("garbage.pt", GARBAGE)(tmp_path)
    (tmp_path / "pool").mkdir()
    proc = subprocess.run([sys.executable, "-m", "noisystudent", "label", str(bad), str(tmp_path / "pool"),
                           "--out", str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"noisystudent: error: not a noisystudent checkpoint: {bad} "
                                        "(not a file written by torch.save)"]


# ------------------------------------------------------------------------------ image folders


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` 1-bit pixels: PIL refuses to open it as a
    decompression bomb (Image.DecompressionBombError) when the size is over twice its pixel limit,
    so the file costs a few bytes instead of 400 MB of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _folder_yaml(tmp_path, **over):
    d = dict(train_dir=tmp_path / "train", test_dir=tmp_path / "test", unlabeled_dir=tmp_path / "pool")
    d.update(over)
    lines = "\n".join(f"  {k}: {v}" for k, v in d.items())
    return f"data:\n  source: image-folder\n  labels_per_class: null\n  val_per_class: 2\n  image_size: 12\n{lines}\n"


@pytest.mark.parametrize("breakage,expected", [
    (lambda r: shutil.rmtree(r / "train"), "train folder not found: {r}/train"),
    (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "train class folder {r}/train/dog contains no images"),
    (lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()], "train folder {r}/train has no class subfolders"),
    (lambda r: (r / "train" / "cat" / "0.png").write_bytes(b""), "unreadable image {r}/train/cat/0.png: empty file"),
    (lambda r: (r / "train" / "cat" / "1.png").write_text("not an image"), "unreadable image {r}/train/cat/1.png"),
    (lambda r: _cut(r / "train" / "cat" / "2.png"), "unreadable image {r}/train/cat/2.png"),
    (lambda r: _cut(r / "test" / "dog" / "1.png"), "unreadable image {r}/test/dog/1.png"),
    (lambda r: (r / "test" / "dog").rename(r / "test" / "wolf"), "test folder {r}/test has classes ['cat', 'wolf']"),
    (lambda r: shutil.rmtree(r / "train" / "dog"), "has only one class (cat)"),
    (lambda r: [p.unlink() for p in (r / "pool").rglob("*.png")], "{r}/pool"),
    (lambda r: (r / "train" / "dog" / "3.png").write_bytes(_png_claiming(20000, 20000)),
     "image {r}/train/dog/3.png is too large to decode (Image size (400000000 pixels) exceeds limit"),
    (lambda r: [(r / "train" / "dog" / f"{i}.png").unlink() for i in range(2, 12)],
     "data.val_per_class=2: class 'dog' has 2 training images and all would be held out (2 requested); lower it"),
    (lambda r: [(r / "train" / "dog" / f"{i}.png").unlink() for i in range(1, 12)],
     "data.val_per_class=2: class 'dog' has 1 images, fewer than the 2 requested"),
], ids=["no train folder", "empty class folder", "no class folders", "zero-byte image", "non-image file",
        "truncated image", "truncated test image", "mismatched class lists", "single class", "empty pool",
        "decompression bomb", "val_per_class takes every image", "val_per_class above the images"])
def test_bad_folders_fail_in_one_line_with_nothing_left(folders, capsys, breakage, expected):
    breakage(folders)
    cfg = folders / "cfg.yaml"
    cfg.write_text(_folder_yaml(folders))
    out = folders / "run"
    code = main(["run", str(cfg), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("noisystudent: error: "), err
    assert expected.format(r=folders) in err[0]
    assert not (out / "summary.json").exists() and not (out / "teacher").exists()
    assert RunDir(out).manifest()["stages"] == {}  # no stage finished (a missing manifest reads as none)


def _odd_image(mode: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), "tif"
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
        return img, "png"
    if mode == "CMYK":
        return rgb.convert("CMYK"), "jpg"
    return rgb.convert(mode), "png"


@pytest.mark.parametrize("channels", [3, 1])
def test_odd_but_valid_images_are_accepted(tmp_path, channels):
    """CMYK JPEGs, 16-bit TIFFs, RGBA, palette (with transparency), grayscale, LA and 1-bit
    images of different sizes in one folder: the splits load, and every image becomes a tensor
    of the configured channels and size, as training and labeling see it."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "CMYK", "I;16", "RGBA", "P", "P+transparency", "L", "LA", "1"]
    sizes = [(10, 10), (13, 7), (31, 20), (8, 40)]
    for split, n in (("train", 12), ("test", 5)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                img, ext = _odd_image(modes[i % len(modes)], sizes[i % len(sizes)], rng)
                img.save(tmp_path / split / c / f"{i}.{ext}")
    make_folder(tmp_path / "pool", classes=("x",), n=3)
    splits = build_splits(folder_cfg(tmp_path, val_per_class=2, image_size=8, channels=channels), seed=0)
    assert len(splits.labeled) == 20 and len(splits.test) == 10 and splits.channels == channels
    cfg = load_config(None)
    noisy = train_transform(8, channels, splits.mean, splits.std, cfg.noise, False)
    clean = eval_transform(8, channels, splits.mean, splits.std)
    for images in (splits.labeled, splits.val, splits.test):
        for i in range(len(images)):
            for transform in (noisy, clean):
                x = transform(images.load(i))
                assert x.shape == (channels, 8, 8) and torch.isfinite(x).all()


# ------------------------------------------------------------------------------ pretrained files


def test_a_students_pretrained_file_for_another_architecture_is_found_before_any_training(tmp_path):
    """check_pretrained_files reads every stage's file lazily and builds the models on the meta
    device: the student's ns_cnn_s weights for ns_cnn_m are refused up front, naming the key."""
    good, other = tmp_path / "s.pt", tmp_path / "for-s.pt"
    for path in (good, other):
        save_model(path, create_model("ns_cnn_s", 10, 1), name="ns_cnn_s", num_classes=10, in_chans=1,
                   classes=[str(i) for i in range(10)], image_size=16, mean=(0.5,), std=(0.2,))
    classes = [str(i) for i in range(10)]
    ok = load_config(None, [f"teacher.pretrained={good}", f"students.0.pretrained={other}"])
    check_pretrained_files(resolve_stages(ok), num_classes=10, channels=1, classes=classes)  # s -> s fits
    bad = load_config(None, [f"teacher.pretrained={good}", f"students.1.pretrained={other}"])
    with pytest.raises(CheckpointError, match=r"^config key 'students\[1\]\.pretrained': .*for-s\.pt: weights "
                                              r"for another architecture than ns_cnn_m: the file is for ns_cnn_s"):
        check_pretrained_files(resolve_stages(bad), num_classes=10, channels=1, classes=classes)
    (tmp_path / "garbage.pt").write_bytes(GARBAGE)
    for key in ("teacher.pretrained", "students.0.pretrained"):
        cfg = load_config(None, [f"{key}={tmp_path / 'garbage.pt'}"])
        dotted = key.replace("students.0", "students[0]")
        with pytest.raises(CheckpointError, match="^" + re.escape(f"config key '{dotted}': not a weight file: ")):
            check_pretrained_files(resolve_stages(cfg), num_classes=10, channels=1, classes=classes)
    with pytest.raises(CheckpointError, match=r"^config key 'teacher\.pretrained': unknown pretrained tag"):
        check_pretrained_files(resolve_stages(load_config(None, ["teacher.pretrained=resnet18.no_such_tag"])),
                               num_classes=10, channels=1, classes=classes)


# ------------------------------------------------------------------------------ data left unused


def test_a_file_named_with_a_line_break_is_named_for_what_it_is(folders, caplog):
    """'0.png\\n' is not an image by extension only because of its line break: the warning says
    so, quoted, on one line (the name printed raw would break the line)."""
    import logging

    (folders / "train" / "cat" / "0.png").rename(folders / "train" / "cat" / "0.png\n")
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        splits = build_splits(folder_cfg(folders), seed=0)
    assert len(splits.labeled) + len(splits.val) == 23
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"train folder {folders / 'train'}: skipped 1 file(s) whose name holds a line break or "
                       "other control character ('cat/0.png\\n'); rename them to use them")


def _user_folder_run(folders: Path, *sets: str) -> list[str]:
    """`noisystudent run` on the user's own folders through --set, over the built-in demo config."""
    return ["run", "--out", str(folders / "run"), "--quiet",
            *[a for s in (f"data.source=image-folder", f"data.train_dir={folders / 'train'}",
                          f"data.test_dir={folders / 'test'}", f"data.unlabeled={folders / 'pool'}",
                          "data.val_per_class=2", "data.image_size=8", "teacher.epochs=0", "students=[]", *sets)
              for a in ("--set", s)]]


def test_the_demos_label_budget_stays_with_the_demo(folders, capsys):
    """The demo's data.labels_per_class (5 per class) belongs to its digits: a user's folder that
    replaces the source keeps every label (10 per class here, 2 of each for validation), unless the
    user sets the budget too, which then warns under --quiet."""
    assert load_config(None).data.labels_per_class == 5
    assert load_config(None, ["data.source=image-folder", "data.train_dir=x"]).data.labels_per_class is None
    assert load_config(None, ["data.source=image-folder", "data.train_dir=x",
                              "data.labels_per_class=3"]).data.labels_per_class == 3
    assert main(_user_folder_run(folders)) == 0
    data = json.loads((folders / "run" / "data.json").read_text())
    assert data["labeled_per_class"] == [10, 10] and data["num_labels_moved_to_pool"] is None
    assert "labels_per_class" not in capsys.readouterr().err
    shutil.rmtree(folders / "run")
    assert main(_user_folder_run(folders, "data.labels_per_class=4")) == 0
    err = capsys.readouterr().err
    assert ("data.labels_per_class=4: kept 8 labeled training images and moved 12 to the unlabeled pool; with no "
            "student (students=[]) nothing reads the pool: these images are not used at all") in err


def test_the_demos_test_budget_stays_with_the_demo_and_a_users_unused_one_warns(folders, capsys):
    """The demo's data.test_per_class (40) is dropped where the new source has its own test split
    (a test folder, Fashion-MNIST, torchvision), kept where it is needed (a folder without a test
    folder); a test_per_class the user sets that the source leaves unused is a warning under --quiet."""
    assert load_config(None).data.test_per_class == 40
    folder = ["data.source=image-folder", "data.train_dir=x"]
    assert load_config(None, folder).data.test_per_class == 40  # no test folder: the demo's hold-out
    assert load_config(None, [*folder, "data.test_dir=y"]).data.test_per_class is None
    assert load_config(None, ["data.source=fashion-mnist"]).data.test_per_class is None
    assert load_config(None, ["data.source=fashion-mnist", "data.test_per_class=7"]).data.test_per_class == 7
    assert main(_user_folder_run(folders)) == 0
    assert "test_per_class" not in capsys.readouterr().err  # the demo's key, not the user's: no warning
    data = json.loads((folders / "run" / "data.json").read_text())
    assert data["num_test"] == 6  # the test folder, whole (3 images of each class)
    shutil.rmtree(folders / "run")
    assert main(_user_folder_run(folders, "data.test_per_class=3")) == 0
    [warning] = [ln for ln in capsys.readouterr().err.splitlines() if "test_per_class" in ln]
    assert warning == (f"data.test_per_class=3 is unused: data source image-folder has a test split of its own "
                       f"(data.test_dir {folders / 'test'}), which is the test split; remove the key")
    assert json.loads((folders / "run" / "data.json").read_text())["num_test"] == 6


def test_moved_labels_no_stage_reads_are_a_warning_under_quiet(tmp_path, capsys):
    """students=[] with the demo's label budget: the moved images are used by nothing, which
    --quiet still shows (a warning); with students they are the pool, as the demo intends."""
    argv = ["run", "--out", str(tmp_path / "run"), "--quiet", "--set", "teacher.epochs=0", "--set", "students=[]"]
    assert main(argv) == 0
    [warning] = [ln for ln in capsys.readouterr().err.splitlines() if "labels_per_class" in ln]
    assert warning.startswith("data.labels_per_class=5: kept 50 labeled training images and moved ")
    assert "nothing reads the pool: these images are not used at all" in warning


# ------------------------------------------------------------------------------ what is left behind, what is shown


def test_evaluate_a_bad_checkpoint_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    """`evaluate BAD.pt` (its results would go to evaluate-BAD/ beside it) stops in one line and
    leaves no empty evaluate-BAD/; a folder the user made is kept."""
    bad = _file("BAD.pt", GARBAGE)(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(bad), "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BAD.pt"]
    (tmp_path / "mine").mkdir()
    assert main(["evaluate", str(bad), "--out", str(tmp_path / "mine"), "--quiet"]) == 2
    assert (tmp_path / "mine").is_dir()


def test_report_on_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    _file("other/notes.txt", "x")(tmp_path)
    assert main(["report", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"noisystudent: error: report: {tmp_path / 'other'} is not a run directory (none of manifest.json, "
        "config.yaml, summary.json)"]


def test_report_md_shows_class_names_as_text_not_html(tmp_path):
    """Class folders named like HTML: report.md (rendered by GitHub, editors, wikis) carries them
    as entities, as report.html escapes them; the names themselves reach the report."""
    names = ("<img src=x onerror=alert(1)>", "dogs & <b>cats")
    for split, n in (("train", 4), ("test", 2)):
        for name in names:
            make_folder(tmp_path / split, classes=(name,), n=n)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: image-folder\n  train_dir: {tmp_path / 'train'}\n  test_dir: {tmp_path / 'test'}\n"
                   "  val_per_class: 1\n  image_size: 8\nteacher:\n  epochs: 0\nstudents: []\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "dogs &amp; &lt;b&gt;cats" in md
    for text in (md, page):
        assert "<img src=x" not in text and "<b>cats" not in text
