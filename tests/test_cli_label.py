import numpy as np
from PIL import Image

from noisystudent.models.checkpoint import save_model
from noisystudent.cli import main
from noisystudent.label.store import LabelStore
from noisystudent.models.factory import create_model


def test_label_command_streams_a_folder_into_a_store(tmp_path, capsys):
    pool = tmp_path / "pool" / "a" / "b"
    pool.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), "L").save(pool / f"{i}.png")
    (pool / "broken.png").write_bytes(b"")
    model = create_model("ns_cnn_s", 10, 1)
    ckpt = tmp_path / "teacher.pt"
    save_model(ckpt, model, name="ns_cnn_s", num_classes=10, in_chans=1, classes=[str(i) for i in range(10)],
               image_size=12, mean=(0.5,), std=(0.25,))
    store = tmp_path / "store"
    assert main(["label", str(ckpt), str(tmp_path / "pool"), "--out", str(store), "--top-k", "3",
                 "--workers", "0", "--shard-size", "4", "--quiet"]) == 0
    labels = LabelStore.open(store).to_pseudo_labels()
    assert len(labels) == 7 and labels.topk_index.shape == (7, 3)
    assert all(k.endswith(".png") and "broken" not in k for k in labels.keys)
    assert "broken.png" in (store / "bad_images.tsv").read_text()
    assert main(["label", str(ckpt), str(tmp_path / "nowhere"), "--out", str(store)]) == 2
    assert "unlabeled pool not found: " + str(tmp_path / "nowhere") in capsys.readouterr().err
