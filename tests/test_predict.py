"""`noisystudent predict` and evaluate.predict.Predictor: top-k class names and probabilities of
new images from a run directory, a model.pt or an exported folder, for folders, file lists, tar
shards and image files, to CSV, JSON lines and Parquet, with unreadable images listed; checked
against the model run by hand on the checkpoint's own clean preprocessing."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from _tiny import tiny
import noisystudent.evaluate.predict as predict_module
from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.data.transforms import eval_transform
from noisystudent.evaluate.predict import Predictor, unreadable_path
from noisystudent.models.checkpoint import clean_transform, load_model, save_model
from noisystudent.models.export import export_model
from noisystudent.models.factory import create_model
from noisystudent.pipeline import run_pipeline
from noisystudent.runtime.errors import NoisyStudentError
from noisystudent.runtime.rundir import MODEL, TEACHER, RunDir

CLASSES = [f"digit-{i}" for i in range(10)]
# One epoch of a digits teacher and nothing else: a real run directory in seconds.
TINY_RUN = tiny("teacher.epochs=1", "students=[]", "evaluate.suites=[]")


def _digit(i: int, mode: str = "L") -> Image.Image:
    image = load_digits().images[i]
    return Image.fromarray((image * 15).astype(np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 12 digit images (one in a subfolder, one RGB, one JPEG) and two unreadable files."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(10):
        _digit(i).save(root / f"{i:02d}.png")
    _digit(10).save(root / "sub" / "10.png")
    _digit(11, "RGB").save(root / "11.jpg", quality=95)
    (root / "broken.png").write_bytes(b"this is not an image")
    (root / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint (save_model's file) of a freshly initialised ns_cnn_s with named classes."""
    torch.manual_seed(0)
    model = create_model("ns_cnn_s", 10, 1)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(path, model, name="ns_cnn_s", num_classes=10, in_chans=1, classes=CLASSES, image_size=16,
               mean=(0.3,), std=(0.35,))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test one-thread fixture
    try:
        run_pipeline(load_config("digits", TINY_RUN), root, progress=False)
    finally:
        torch.set_num_threads(before)
    return root


def _by_hand(checkpoint: Path, paths: list[Path], k: int = 3) -> dict[str, tuple[list[str], np.ndarray]]:
    """Top-k of each image by the plain model (no BN folding, no DataLoader) on the checkpoint's
    clean transform, the labeler's view of an image."""
    model, meta = load_model(checkpoint)
    model.eval()
    transform = clean_transform(meta)
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([transform(Image.open(p)) for p in paths])), 1)
    top, idx = probs.topk(k, 1)
    return {str(p): ([meta["classes"][i] for i in row], t.numpy()) for p, row, t in zip(paths, idx.tolist(), top)}


def _read(path: Path) -> list[dict]:
    """Rows of a predictions file in any of the three formats, values as the file holds them."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [{k: (float(v) if k.startswith("prob") else v) for k, v in row.items()} for row in csv.DictReader(f)]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()


def _readable(images: Path) -> list[Path]:
    """The folder's images in the folder pool's order (sorted paths, recursively)."""
    return sorted(p for p in images.rglob("*") if p.is_file() and p.name not in ("broken.png", "empty.jpg"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_folder_predictions_match_the_model_run_by_hand(checkpoint, images, tmp_path, suffix):
    out = tmp_path / f"preds{suffix}"
    result = Predictor.load(checkpoint, device="cpu", top_k=3, batch_size=4, num_workers=0).predict_to_file(
        [images], out, progress=False)
    rows = _read(out)
    expected = _by_hand(checkpoint, _readable(images))
    assert [r["image"] for r in rows] == list(expected)  # every readable image, in the pool's order
    assert list(rows[0]) == ["image", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    for row in rows:
        names, probs = expected[row["image"]]
        assert [row[f"class_{r}"] for r in (1, 2, 3)] == names
        np.testing.assert_allclose([row[f"prob_{r}"] for r in (1, 2, 3)], probs, atol=2e-6)
    assert (result.images, result.unreadable, result.out) == (12, 2, out)
    listed = unreadable_path(out).read_text().splitlines()
    assert listed[0] == "image\treason"
    assert sorted(line.split("\t")[0] for line in listed[1:]) == [str(images / "broken.png"), str(images / "empty.jpg")]
    assert "empty file" in unreadable_path(out).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_run_dir_checkpoint_and_export_predict_the_same(run_dir, images, tmp_path):
    """The run directory means its final model; export writes it with the same preprocessing."""
    exported = tmp_path / "exported"
    export_model(run_dir, exported)
    checkpoint = RunDir(run_dir).file(TEACHER, MODEL)
    results = {}
    for name, model in (("run", run_dir), ("checkpoint", checkpoint), ("export", exported)):
        out = tmp_path / f"{name}.csv"
        Predictor.load(model, device="cpu", top_k=10, num_workers=0).predict_to_file([images], out, progress=False)
        results[name] = _read(out)
    expected = _by_hand(checkpoint, _readable(images), k=10)
    for name, rows in results.items():
        assert [r["image"] for r in rows] == list(expected), name
        for row in rows:
            names, probs = expected[row["image"]]
            assert [row[f"class_{r}"] for r in range(1, 11)] == names, name
            np.testing.assert_allclose([row[f"prob_{r}"] for r in range(1, 11)], probs, atol=2e-6, err_msg=name)


def test_the_checkpoints_recorded_preprocessing_is_used(images, tmp_path):
    """A checkpoint recording bicubic resizing and its own mean/std is fed images that way."""
    torch.manual_seed(1)
    model = create_model("ns_cnn_s", 10, 1)
    path = tmp_path / "bicubic.pt"
    save_model(path, model, name="ns_cnn_s", num_classes=10, in_chans=1, classes=CLASSES, image_size=16,
               mean=(0.5,), std=(0.2,), data_config={"interpolation": "bicubic"})
    paths = _readable(images)[:4]
    rows = Predictor.load(path, device="cpu", top_k=10).predict(paths)
    model.eval()
    for bicubic, expected in ((True, True), (False, False)):
        t = eval_transform(16, 1, (0.5,), (0.2,), "bicubic" if bicubic else "bilinear")
        with torch.no_grad():
            probs = torch.softmax(model(torch.stack([t(Image.open(p)) for p in paths])), 1).sort(1, descending=True)[0]
        same = all(np.allclose(r["probs"], p.numpy(), atol=2e-6) for r, p in zip(rows, probs))
        assert same is expected


def test_image_files_file_lists_and_tar_shards(checkpoint, images, tmp_path, monkeypatch):
    """Each kind of SOURCE, several at once, rows in the order of the arguments."""
    paths = _readable(images)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[3:5]))
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for n, p in enumerate(paths[5:7] + [images / "broken.png"]):
            data = p.read_bytes()
            info = tarfile.TarInfo(f"sample{n}{p.suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.chdir(images)  # an image file given relative to the current folder keeps that key
    out = tmp_path / "mixed.jsonl"
    result = Predictor.load(checkpoint, device="cpu", top_k=2, num_workers=0).predict_to_file(
        ["00.png", "sub/10.png", str(listing), str(tar_path)], out, progress=False)
    rows = _read(out)
    keys = [r["image"] for r in rows]
    assert keys == ["00.png", "sub/10.png", str(paths[3]), str(paths[4]), "shard-000/sample0", "shard-000/sample1"]
    expected = _by_hand(checkpoint, [images / "00.png", images / "sub/10.png", *paths[3:7]], k=2)
    for row, (names, probs) in zip(rows, expected.values()):
        assert [row["class_1"], row["class_2"]] == names
        np.testing.assert_allclose([row["prob_1"], row["prob_2"]], probs, atol=2e-6)
    assert result.unreadable == 1 and "shard-000/sample2" in unreadable_path(out).read_text()


def test_workers_and_many_shards_keep_the_pools_order(checkpoint, images, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "SHARD_SIZE", 3)  # 5 shards over 2 workers, batches of 2
    out = tmp_path / "ordered.parquet"
    Predictor.load(checkpoint, device="cpu", top_k=1, batch_size=2, num_workers=2).predict_to_file(
        [images], out, progress=False)
    assert [r["image"] for r in _read(out)] == [str(p) for p in _readable(images)]
    assert unreadable_path(out).read_text().count("\n") == 3  # header + the two unreadable files


def test_in_memory_predict_matches_the_file(checkpoint, images, tmp_path):
    predictor = Predictor.load(checkpoint, device="cpu", top_k=3, batch_size=5, num_workers=0)
    paths = _readable(images)
    rows = predictor.predict([Image.open(p) for p in paths])
    expected = _by_hand(checkpoint, paths)
    for row, (names, probs) in zip(rows, expected.values()):
        assert row["classes"] == names
        np.testing.assert_allclose(row["probs"], probs, atol=2e-6)
    with pytest.raises(NoisyStudentError, match="broken.png"):
        predictor.predict([paths[0], images / "broken.png"])


def test_a_failed_run_leaves_the_previous_output_alone(checkpoint, images, tmp_path, monkeypatch):
    out = tmp_path / "preds.csv"
    out.write_text("earlier results\n")
    calls = []

    def fail_on_second_batch(self, keys, names, probs):
        calls.append(len(keys))
        if len(calls) == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(predict_module._RowWriter, "write", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        Predictor.load(checkpoint, device="cpu", batch_size=2, num_workers=0).predict_to_file(
            [images], out, progress=False)
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def test_cli_predict_writes_and_counts(run_dir, images, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    assert main(["predict", str(images), "--model", str(run_dir), "--out", str(out), "--top-k", "2",
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"predictions: {out} (12 images, top-2, ")
    assert printed[1] == f"unreadable: 2 (listed in {tmp_path / 'cli.parquet.unreadable.tsv'})"
    table = pq.read_table(out)
    assert table.num_rows == 12 and table.column_names == ["image", "class_1", "prob_1", "class_2", "prob_2"]
    assert set(table.column("class_1").to_pylist()) <= set(load_model(RunDir(run_dir).file(TEACHER, MODEL))[1]["classes"])


@pytest.mark.parametrize("args,expected", [
    (lambda r, i, c: [str(i), "--model", str(c), "--out", str(r / "p.txt")],
     "predict: --out {r}/p.txt: the suffix picks the format, one of .csv, .jsonl, .parquet"),
    (lambda r, i, c: [str(i), "--model", str(r / "nope"), "--out", str(r / "p.csv")],
     "predict: --model {r}/nope not found"),
    (lambda r, i, c: [str(i), "--model", str(r), "--out", str(r / "p.csv")],
     "predict: --model {r} is neither a run directory (no manifest.json) nor an exported folder "
     "(no config.json + model.safetensors)"),
    (lambda r, i, c: [str(r / "missing"), "--model", str(c), "--out", str(r / "p.csv")],
     "unlabeled pool not found: {r}/missing"),
    (lambda r, i, c: [str(r / "gone.png"), "--model", str(c), "--out", str(r / "p.csv")],
     "predict: image not found: {r}/gone.png"),
    (lambda r, i, c: [str(i), "--model", str(c), "--out", str(r / "p.csv"), "--top-k", "0"],
     "predict: --top-k and --batch-size must be >= 1"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(checkpoint, images, tmp_path, capsys, args, expected):
    assert main(["predict", *args(tmp_path, images, checkpoint), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("noisystudent: error: ")
    assert expected.format(r=tmp_path) in err[0]
    assert not list(tmp_path.glob("p*"))
