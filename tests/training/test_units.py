"""Units of the training engine: LR schedules, checkpoint verification and pruning, config merging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from upcycle.config import ConfigError
from upcycle.training import checkpoint as ckpt
from upcycle.training.cli import config_from_args
from upcycle.training.config import PretrainConfig, check_resume_compatible
from upcycle.training.reporting import MetricsLog, read_metrics, tracker_scalars
from upcycle.training.schedule import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, steps=110, schedule=schedule)
    warm = [lr_at(s, **kw) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lr_at(10, **kw) == pytest.approx(1.0)
    end = lr_at(110, **kw)
    mid = lr_at(60, **kw)
    if schedule == "constant":
        assert mid == end == 1.0
    else:
        assert end == pytest.approx(0.1)
        assert mid == pytest.approx(0.55)  # halfway: both cosine and linear are at the midpoint
        assert lr_at(35, **kw) > (0.55 if schedule == "cosine" else 0) and lr_at(35, **kw) < 1.0
    assert all(lr_at(s, **kw) >= 0.1 - 1e-12 for s in range(200))


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"step-{step}"
    (folder / ckpt.STATE_DIR).mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / ckpt.STATE_DIR / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step}))
    ckpt.write_manifest(folder, step)
    return folder


def test_verify_detects_truncation_missing_files_and_bad_bytes(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    assert ckpt.verify_checkpoint(folder) is None
    blob = folder / "model.safetensors"
    blob.write_bytes(b"x" * 50)
    assert "has 50 bytes, expected 100" in ckpt.verify_checkpoint(folder)
    blob.write_bytes(b"y" * 100)
    assert "does not match its checksum" in ckpt.verify_checkpoint(folder)
    blob.unlink()
    assert "model.safetensors is missing" in ckpt.verify_checkpoint(folder)
    (folder / ckpt.MANIFEST).write_text("{not json")
    assert ckpt.verify_checkpoint(folder) == "corrupted manifest.json"


def test_find_resumable_reports_and_skips_broken_ones(tmp_path):
    for s in (5, 10, 15):
        make_checkpoint(tmp_path / ckpt.CHECKPOINTS, s)
    (tmp_path / ckpt.CHECKPOINTS / "step-15" / "config.json").write_text('{"x": 1}')
    (tmp_path / ckpt.CHECKPOINTS / ".step-20.tmp-abc").mkdir()  # an interrupted save
    warnings = []
    step, folder = ckpt.find_resumable(tmp_path, warn=warnings.append)
    assert step == 10 and folder.name == "step-10"
    assert len(warnings) == 1 and "step-15" in warnings[0] and "config.json" in warnings[0]
    assert ckpt.clean_temporaries(tmp_path / ckpt.CHECKPOINTS)[0].name == ".step-20.tmp-abc"
    assert ckpt.find_resumable(tmp_path / "nothing") is None


def test_prune_keeps_the_newest_and_drops_abandoned_futures(tmp_path):
    for s in (2, 4, 6, 8, 12):
        make_checkpoint(tmp_path, s)
    # Resumed from 6 after step-8/12 went bad, now saved step-8 again: 12 belongs to the abandoned run.
    removed = ckpt.prune(tmp_path, keep_last=2, current_step=8)
    assert sorted(p.name for p in removed) == ["step-12", "step-2", "step-4"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    assert ckpt.prune(tmp_path, keep_last=0, current_step=8) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-6", "step-8"]


def test_metrics_log_truncates_records_after_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.write({"kind": "train", "step": s, "loss": float("nan") if s == 3 else 1.0})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # cut short by a crash
    assert log.truncate_after(3) == 3
    records = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["loss"] == "nan"


def test_tracker_scalars_flatten_routing():
    record = {
        "kind": "train",
        "step": 3,
        "loss": 2.0,
        "routing": {"1": {"fraction": [0.25, 0.75], "balance": 0.8, "max_violation": 0.5}},
    }
    scalars = tracker_scalars(record)
    assert scalars == {
        "train/loss": 2.0,
        "routing/layer_1/expert_0": 0.25,
        "routing/layer_1/expert_1": 0.75,
        "routing/layer_1/balance": 0.8,
        "routing/layer_1/max_violation": 0.5,
    }


def test_config_layers_and_resume_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = PretrainConfig(model="debug", data="a.jsonl", seq_len=64, steps=100, lr=1e-3, out=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(saved.resolved().to_dict()))
    user_yaml = tmp_path / "more.yaml"
    user_yaml.write_text("steps: 300\nlog-every: 7\n")
    # --resume: saved run config < YAML < flags.
    args = {"config": str(user_yaml), "out": str(run), "resume": True, "lr": 5e-4, "steps": None}
    cfg = config_from_args(args)
    assert (cfg.seq_len, cfg.steps, cfg.log_every, cfg.lr, cfg.model) == (64, 300, 7, 5e-4, "debug")
    check_resume_compatible(saved, cfg)
    with pytest.raises(ConfigError) as err:
        check_resume_compatible(
            saved, PretrainConfig(model="debug", data="a.jsonl", seq_len=128, out=str(run))
        )
    assert err.value.field == "seq_len" and "used 64" in err.value.allowed
    # The C4 default resolves its config name; unknown YAML keys are refused by name.
    assert (
        PretrainConfig().resolved_data_config == "en"
        and PretrainConfig().resolved().min_lr == pytest.approx(2e-5)
    )
    user_yaml.write_text("step: 3\n")
    with pytest.raises(ConfigError) as err:
        config_from_args({"config": str(user_yaml)})
    assert err.value.field == "step"
    assert math.isclose(PretrainConfig(lr=1e-3).resolved_min_lr, 1e-4)


def test_display_bar_and_lines(capsys):
    from upcycle.training.reporting import Display

    record = {"step": 5, "loss": 2.5, "lm_loss": 2.4, "aux_loss": 0.1, "accuracy": 0.3, "lr": 1e-4,
              "grad_norm": 0.5, "tokens_per_s": 1234.0, "skipped_nonfinite": 1}  # fmt: skip
    bar = Display(10, 0, "bar")
    bar.set_start(4)
    bar.step(5, 2.5, 1234.0)
    bar.train_record(record)  # the bar shows it; no extra line
    bar.print("eval step 5: ...")
    bar.close()
    lines = Display(10, 4, "lines")
    lines.train_record(record)
    out = capsys.readouterr().out
    assert "eval step 5" in out
    assert (
        "step 5/10 | loss 2.5000 | lm 2.4000 | aux 0.1 | acc 0.300 | lr 1.00e-04 | grad 0.5 | 1,234 tok/s"
        in out
    )
    assert "skipped 1" in out
    assert (
        PretrainConfig(steps=500).resolved_warmup == 5
        and PretrainConfig(steps=500, warmup=0).resolved_warmup == 0
    )


def test_eval_source_defaults(tmp_path):
    from upcycle.data.sources import resolve_source
    from upcycle.training.loop import eval_source

    hub = PretrainConfig()
    spec = eval_source(
        hub, resolve_source(hub.data, hub.resolved_data_config, hub.data_split, hub.text_field)
    )
    assert (spec.name, spec.config, spec.split) == ("allenai/c4", "en", "validation")  # C4 validation
    local = tmp_path / "train.jsonl"
    local.write_text('{"text": "a"}\n')
    cfg = PretrainConfig(data=str(local))
    train = resolve_source(cfg.data, None, "train", "text")
    assert eval_source(cfg, train) is None  # no held-out split of a local file unless given
    assert eval_source(PretrainConfig(data=str(local), eval_data=str(local)), train).files == (str(local),)
    assert eval_source(PretrainConfig(eval_data="none"), spec) is None
