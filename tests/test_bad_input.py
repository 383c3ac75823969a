"""Bad input as users meet it, through the command line: every mistake in a config, a data folder,
a checkpoint or a run directory stops the command with exit code 2 and exactly one line on stderr
that names the key or file at fault, never a traceback, and never PyTorch's advice to load a file
unsafely. Unusual but valid images (CMYK, 16-bit, RGBA, palette, mixed modes and sizes) work.

Each case fails before any training: the config cases in the parser, the data cases while the
splits are built, the checkpoint cases when the file is opened.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
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
from noisystudent.data.datasets import build_splits
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
], ids=["no train folder", "empty class folder", "no class folders", "zero-byte image", "non-image file",
        "truncated image", "truncated test image", "mismatched class lists", "single class", "empty pool"])
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
