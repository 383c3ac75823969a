"""The training loop's building blocks: data streams, checkpoint files, precision, optimizer."""

import json
import logging
import random
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from noisystudent.config.schema import TrainConfig, load_config
from noisystudent.config.stages import resolve_stages
from noisystudent.runtime.distributed import DistContext, all_gather_object, any_rank, local_batch_size
from noisystudent.runtime.errors import CheckpointError, ConfigError
from noisystudent.evaluate.classifier import evaluate_classifier
from noisystudent.train.loop import (SeededSamples, StreamSampler, build_optimizer, build_scheduler,
                                resolve_precision, train_classifier)
from noisystudent.train.state import (capture_rng_state, catch_sigterm, list_checkpoints,
                                      load_checkpoint_file, load_latest_checkpoint, restore_rng_state,
                                      save_checkpoint)
from noisystudent.train.trainer import (Hooks, Recipe, RunContext, Trainer, evaluations_without_improvement,
                                        patience_exhausted)
from _train_scenarios import NUM_CLASSES, TinyNet, digits_data, noisy_model, student_config
from _tiny import Crash, CrashAt


def ctx_of(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world)


def take(sampler: StreamSampler, steps: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.local_batch)] for _ in range(steps)]


def test_stream_is_the_same_global_batches_for_any_number_of_processes():
    size, batch, steps = 13, 8, 7  # batches straddle passes over the data
    single = take(StreamSampler(size, batch, ctx_of(0, 1), seed=4), steps)
    for world in (2, 4):
        per_rank = [take(StreamSampler(size, batch, ctx_of(r, world), seed=4), steps) for r in range(world)]
        for k in range(steps):
            assert [item for r in range(world) for item in per_rank[r][k]] == single[k]
    positions = [p for step in single for p, _ in step]
    assert positions == list(range(steps * batch))
    indices = [i for step in single for _, i in step]
    for start in range(0, len(indices) - size + 1, size):  # every pass is a permutation
        assert sorted(indices[start:start + size]) == list(range(size))
    assert take(StreamSampler(size, batch, ctx_of(0, 1), seed=5), 2) != single[:2]


def test_stream_resumes_by_arithmetic():
    full = take(StreamSampler(13, 8, ctx_of(1, 2), seed=0), 9)
    assert take(StreamSampler(13, 8, ctx_of(1, 2), seed=0, start_step=5), 4) == full[5:]


def test_global_batches_must_split_evenly():
    assert local_batch_size(12, ctx_of(0, 4)) == 3
    with pytest.raises(ConfigError, match="train.batch_size.*3 processes"):
        local_batch_size(8, ctx_of(0, 3))
    labeled, pseudo, val = digits_data(num_pseudo=24)
    cfg = TrainConfig(batch_size=4, unlabeled_ratio=1.5)  # 6 pseudo-labeled images over 4 ranks
    with pytest.raises(ConfigError, match="unlabeled_ratio"):
        train_classifier(TinyNet(), labeled, val, cfg, num_classes=NUM_CLASSES, epochs=1, lr=0.1,
                         ctx=ctx_of(0, 4), pseudo=pseudo, progress=False)


class RandomItems(Dataset):
    """An 'augmentation' drawing from all three global generators."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return random.random(), float(np.random.rand()), torch.rand(()).item()


def test_augmentation_depends_on_stream_position_only():
    data = SeededSamples(RandomItems(), seed=9)
    random.seed(1)
    before = capture_rng_state()
    first = data.__getitems__([(0, 5), (1, 7), (2, 5)])
    after = capture_rng_state()  # the caller's generators are left as they were
    assert after["python"] == before["python"] and torch.equal(after["torch"], before["torch"])
    assert torch.equal(after["numpy"][1], before["numpy"][1])
    torch.rand(10), random.random()  # whatever ran in between, in whichever process, does not matter
    assert data.__getitems__([(0, 5), (1, 7), (2, 5)]) == first
    assert first[0] != first[2]  # the same image twice is augmented differently
    assert data.__getitems__([(3, 5), (4, 7)])[0] != first[0]  # and so is a batch elsewhere in the stream


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    state = capture_rng_state()
    expected = random.random(), np.random.randn(), torch.rand(3)
    save_checkpoint(tmp_path, 1, {"format": 1, "rng": state}, keep=1)
    restore_rng_state(load_checkpoint_file(tmp_path / "step-000000001.pt")["rng"])
    got = random.random(), np.random.randn(), torch.rand(3)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_checkpoints_are_atomic_pruned_and_skip_unreadable_files(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"format": 1, "step": step, "w": torch.full((3,), step)}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004.pt", "step-000000006.pt",
                                                            "step-000000008.pt"]
    # A write killed half-way leaves only a hidden temporary file: ignored, then removed.
    (tmp_path / ".step-000000010.pt.tmp").write_bytes(b"\x80\x02torn")
    # A complete file that cannot be read (disk error) falls back to the one before it.
    (tmp_path / "step-000000008.pt").write_bytes(b"not a checkpoint")
    path, payload = load_latest_checkpoint(tmp_path)
    assert path.name == "step-000000006.pt" and payload["step"] == 6
    assert not (tmp_path / ".step-000000010.pt.tmp").exists()
    assert load_latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(CheckpointError, match=r"not a noisystudent training checkpoint: .*step-000000008\.pt "
                                              r"\(not a file written by torch.save\)"):
        load_checkpoint_file(tmp_path / "step-000000008.pt")


def test_sigterm_handler_is_restored():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with catch_sigterm() as flag:
            signal.raise_signal(signal.SIGTERM)
            assert flag.requested
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_single_process_collectives_are_identity():
    ctx = DistContext()
    assert any_rank(True, ctx) and not any_rank(False, ctx)
    assert all_gather_object({"a": 1}, ctx) == [{"a": 1}]


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None  # fp32: see benchmarks/train_throughput.py
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision("fp16", cpu)
    labeled, _, val = digits_data()
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        train_classifier(noisy_model(), labeled, val, TrainConfig(batch_size=8, sync_bn=True),
                         num_classes=NUM_CLASSES, epochs=1, lr=0.1, ctx=ctx_of(0, 2), progress=False)


def test_paper_optimizer_and_staircase_schedule():
    model = TinyNet()
    cfg = TrainConfig(optimizer="rmsproptf", weight_decay=1e-5, scheduler="step", decay_epochs=2.4,
                      decay_rate=0.97, warmup_epochs=0)
    opt = build_optimizer(model, cfg, lr=0.128)
    assert type(opt).__name__ == "RMSpropTF"
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.param_groups[0]["alpha"] == 0.9
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-5}  # none on biases
    sched = build_scheduler(opt, cfg, 0.128, per_epoch=10, total_steps=100)
    lrs = {}
    for step in (0, 23, 24, 47, 48, 99):
        sched.step_update(num_updates=step)
        lrs[step] = opt.param_groups[0]["lr"]
    assert lrs[0] == lrs[23] == pytest.approx(0.128)  # x0.97 every 2.4 epochs = 24 steps
    assert lrs[24] == lrs[47] == pytest.approx(0.128 * 0.97)
    assert lrs[48] == pytest.approx(0.128 * 0.97 ** 2) and lrs[99] == pytest.approx(0.128 * 0.97 ** 4)


def test_ema_bf16_channels_last_and_final_weights(tmp_path):
    """The EMA weights are evaluated and returned; bf16 autocast and channels_last run on CPU."""
    labeled, pseudo, val = digits_data(num_pseudo=24)
    runs = {}
    for name, extra in (("plain", {}), ("ema", dict(ema=True, ema_decay=0.5, precision="bf16",
                                                     channels_last=True))):
        model = noisy_model()
        outcome = train_classifier(model, labeled, val, student_config(**extra), num_classes=NUM_CLASSES,
                                   epochs=1, lr=0.05, ctx=DistContext(), pseudo=pseudo, seed=1,
                                   progress=False, keep_best=False)
        assert outcome.steps == 7 and outcome.images_seen == 7 * 32
        assert evaluate_classifier(model, val, torch.device("cpu"))["top1"] == outcome.history[-1]["val_top1"]
        assert np.isfinite(outcome.history[-1]["loss"])
        runs[name] = model.state_dict()
    assert not torch.equal(runs["plain"]["fc.weight"], runs["ema"]["fc.weight"])


def test_dataloader_workers_do_not_change_the_run():
    labeled, pseudo, val = digits_data(num_pseudo=24)
    weights = []
    for workers in (0, 2):
        model = noisy_model()
        train_classifier(model, labeled, val, student_config(), num_classes=NUM_CLASSES, epochs=1, lr=0.05,
                         ctx=DistContext(), pseudo=pseudo, seed=1, progress=False, num_workers=workers)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_checkpoint_of_another_setup_is_refused(tmp_path):
    labeled, pseudo, val = digits_data(num_pseudo=24)
    kwargs = dict(num_classes=NUM_CLASSES, lr=0.05, ctx=DistContext(), seed=1, progress=False,
                  checkpoint_dir=tmp_path)
    first = train_classifier(TinyNet(), labeled, val, student_config(), epochs=1, **kwargs)
    assert first.checkpoint.name == "step-000000007.pt"
    again = train_classifier(TinyNet(), labeled, val, student_config(), epochs=1, **kwargs)
    assert again.resumed_from_step == 7 and again.best_val_top1 == first.best_val_top1  # nothing left to do
    with pytest.raises(CheckpointError, match="another training setup.*total_steps"):
        train_classifier(TinyNet(), labeled, val, student_config(), epochs=2, **kwargs)


# ------------------------------------------------------------------------------ the Trainer API


def _tiny_fit(labeled, val, checkpoint_dir=None, callbacks=(), **train):
    """TinyNet on the digits, 8 labeled images a step (7 steps an epoch), up to 12 epochs."""
    torch.manual_seed(0)
    model = TinyNet()
    recipe = Recipe(name="teacher", num_classes=NUM_CLASSES, epochs=12, lr=0.2, seed=2,
                    train=student_config(checkpoint_every=4, **train))
    run = RunContext(ctx=DistContext(), progress=False, checkpoint_dir=checkpoint_dir, callbacks=list(callbacks))
    return model, Trainer(recipe, run).fit(model, labeled, val)


def _strip(history):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]  # timings vary


def test_patience_rule():
    h = [{"val_top1": v} for v in (10.0, 20.0, 20.0, 15.0)]
    assert [evaluations_without_improvement(h[:n]) for n in range(5)] == [0, 0, 0, 1, 2]  # a tie is no improvement
    assert patience_exhausted(h, 2) and not patience_exhausted(h, 3) and not patience_exhausted(h, None)
    assert not patience_exhausted([], 1)


def test_early_stopping_stops_within_the_cap_and_resumes_to_the_same_stop(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical runs to compare
    try:
        labeled, _, val = digits_data(augment=False)
        _, full = _tiny_fit(labeled, val)  # no patience: all 12 epochs
        model, stopped = _tiny_fit(labeled, val, tmp_path / "a", patience=2)
        with pytest.raises(Crash):  # killed in epoch 3 (the 8th step), after the checkpoint of step 16
            _tiny_fit(CrashAt(labeled, 8 * 16 + 5), val, tmp_path / "b", patience=2)
        resumed_model, resumed = _tiny_fit(labeled, val, tmp_path / "b", patience=2)
        _, again = _tiny_fit(labeled, val, tmp_path / "b", patience=2)  # the stop's checkpoint: nothing left
    finally:
        torch.set_num_threads(before)
    n = len(stopped.history)
    assert full.steps == 84 and not full.stopped_early and full.stopped_at_epoch is None
    assert stopped.stopped_early and stopped.stopped_at_epoch == n < 12 and stopped.steps == 7 * n
    assert stopped.epochs == n and stopped.images_seen == 8 * 7 * n
    # the same steps as the capped run until the stop (the lr schedule spans the cap), and the rule held
    assert _strip(stopped.history) == _strip(full.history[:n])
    assert evaluations_without_improvement(stopped.history) == 2
    assert all(evaluations_without_improvement(stopped.history[:k]) < 2 for k in range(1, n))
    assert stopped.best_epoch == max(stopped.history, key=lambda r: r["val_top1"])["epoch"]
    assert list_checkpoints(tmp_path / "a")[-1].name == f"step-{7 * n:09d}.pt"
    assert resumed.resumed_from_step == 16 and _strip(resumed.history) == _strip(stopped.history)
    assert (resumed.stopped_early, resumed.stopped_at_epoch, resumed.steps) == (True, n, 7 * n)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert again.resumed_from_step == 7 * n and again.stopped_early and again.steps == 7 * n


class Collect:
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step(self, record):
        self.steps.append(record)

    def on_epoch(self, record):
        self.epochs.append(record)


def test_callbacks_get_every_evaluation_and_every_nth_step():
    labeled, _, val = digits_data(augment=False)
    collect, epochs_only = Collect(), []
    torch.manual_seed(0)
    recipe = Recipe(name="teacher", num_classes=NUM_CLASSES, epochs=2, lr=0.1, train=student_config())
    run = RunContext(progress=False, callbacks=[collect, Hooks(on_epoch=epochs_only.append)], step_every=3)
    outcome = Trainer(recipe, run).fit(TinyNet(), labeled, val)
    assert collect.epochs == epochs_only == outcome.history and len(outcome.history) == 2
    assert [r["step"] for r in collect.steps] == [3, 6, 9, 12]
    for r in collect.steps:
        assert set(r) == {"step", "epoch", "loss", "lr", "img_s", "seconds"}
        assert r["img_s"] > 0 and np.isfinite(r["loss"]) and r["epoch"] == pytest.approx(r["step"] / 7)


def test_a_stage_of_few_steps_is_warned_about_and_a_long_one_is_not(caplog):
    labeled, pseudo, val = digits_data(augment=False)  # 50 labeled + 96 pseudo: 7 steps per pass at 8 + 24
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        for epochs in (2, 15):
            recipe = Recipe(name=f"student-{epochs}", num_classes=NUM_CLASSES, epochs=epochs, lr=0.1,
                            train=student_config(checkpoint_every=0))
            Trainer(recipe, RunContext(progress=False)).fit(TinyNet(), labeled, val, pseudo)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("[student-2] only 14 optimizer steps (2 passes of 7 steps")
    assert "50 labeled + 96 pseudo-labeled images" in warned[0] and "train.epochs" in warned[0]
    # in a run, the warning names the key that sets that stage's length
    cfg = load_config(None, ["teacher.model=ns_cnn_s", "students=[{model: ns_cnn_s}, {model: ns_cnn_m}]",
                             "pseudo.ensemble_size=2", "finetune.enabled=true"])
    keys = {s.name: Recipe.of_stage(s, 10).epochs_key for s in resolve_stages(cfg)}
    assert keys == {"teacher": "teacher.epochs", "teacher-2": "teacher.epochs", "baseline": "baseline.epochs",
                    "student-1": "students[0].epochs", "student-2": "students[1].epochs",
                    "fixres": "finetune.epochs"}


def test_stage_patience_resolves_from_train_and_stage_keys():
    cfg = load_config(None, ["train.patience=4", "students=[{model: ns_cnn_s, patience: 2}, {model: ns_cnn_s}]",
                             "finetune.enabled=true"])
    by_name = {s.name: s for s in resolve_stages(cfg)}
    assert by_name["teacher"].train.patience == 4 and by_name["student-1"].train.patience == 2
    assert by_name["student-2"].train.patience == 4 and by_name["fixres"].train.patience is None
    assert by_name["student-1"].train.unlabeled_ratio == cfg.train.unlabeled_ratio
    assert by_name["teacher"].train.unlabeled_ratio == 0
    recipe = Recipe.of_stage(by_name["fixres"], 10)
    assert not recipe.keep_best and recipe.frozen_blocks is None and recipe.train.scheduler == "cosine"
    assert Recipe.of_stage(by_name["teacher"], 10).frozen_blocks == 0
    with pytest.raises(ConfigError, match="patience"):
        load_config(None, ["train.patience=0"])


def test_stage_eval_every_resolves_from_train_and_stage_keys_and_sets_the_validated_epochs(tmp_path):
    from noisystudent.pipeline import run_pipeline
    from _tiny import tiny

    cfg = load_config(None, ["train.eval_every=2", "teacher.eval_every=4", "pseudo.ensemble_size=2",
                             "students=[{model: ns_cnn_s, eval_every: 1}, {model: ns_cnn_m}]"])
    by_name = {s.name: s.train.eval_every for s in resolve_stages(cfg)}
    # the ensemble's teachers and the baseline train with the teacher's recipe, its cadence too
    assert by_name == {"teacher": 4, "teacher-2": 4, "baseline": 4, "student-1": 1, "student-2": 2}
    with pytest.raises(ConfigError, match="eval_every"):
        load_config(None, ["teacher.eval_every=0"])
    cfg = load_config(None, tiny("students=[]", "teacher.epochs=7", "teacher.eval_every=3", "train.checkpoint_every=0"))
    run_pipeline(cfg, tmp_path / "run", progress=False)
    history = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history if "val_top1" in r] == [3, 6, 7]  # and always the last
    metrics = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text())
    assert metrics["best_epoch"] in (3, 6, 7)


def test_a_run_records_the_early_stop_in_metrics_json(tmp_path):
    from noisystudent.pipeline import run_pipeline
    from _tiny import tiny

    cfg = load_config(None, tiny("students=[]", "teacher.epochs=40", "teacher.patience=1", "train.checkpoint_every=0"))
    run_pipeline(cfg, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["stopped_early"] is True and metrics["stopped_at_epoch"] == history[-1]["epoch"] < 40
    assert metrics["epochs"] == len(history) and history[-1]["val_top1"] <= history[-2]["val_top1"]
