"""Typed configs: strict YAML loading, overrides and the resolved file."""

import dataclasses

import pytest

from weatherkd import config as C


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("out_dir: runs/x\ntrain:\n  max_steps: 20\n  lr: 1e-3\ndata:\n  weathers: [snow]\n")
    cfg = C.load(C.StageConfig, path, ["train.lr=0.5", "tracker.kind=none", "model.kwargs={depth: 2}"])
    assert isinstance(cfg.train, C.TrainConfig) and cfg.train.max_steps == 20
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.data.weathers == ["snow"] and cfg.tracker.kind == "none"
    assert cfg.model.kwargs == {"depth": 2}
    C.save(cfg, tmp_path / "out" / "config.yaml")
    again = C.load(C.StageConfig, tmp_path / "out" / "config.yaml")
    assert again == cfg


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.StageConfig, path)
    msg = str(e.value)
    assert str(path) in msg and "'train.max_step'" in msg and "did you mean 'train.max_steps'" in msg


def test_a_bare_no_is_the_choice_no_not_false(tmp_path):
    assert C.load(C.StageConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert C.load(C.StageConfig, path).train.mixed_precision == "no"
    with pytest.raises(C.ConfigError, match="must be true or false"):
        C.load(C.StageConfig, None, ["data.flip=no-thanks"])


def test_wrong_type_and_bad_choice_are_errors(tmp_path):
    with pytest.raises(C.ConfigError, match=r"'train.max_steps' = 'many' must be an integer"):
        C.load(C.StageConfig, None, ["train.max_steps=many"])
    with pytest.raises(C.ConfigError, match=r"must be one of 'no', 'bf16', 'fp16'"):
        C.load(C.StageConfig, None, ["train.mixed_precision=fp8"])
    with pytest.raises(C.ConfigError, match=r"override 'trian.lr=1'.*did you mean 'train'"):
        C.load(C.StageConfig, None, ["trian.lr=1"])
    with pytest.raises(C.ConfigError, match="must look like dotted.key=value"):
        C.load(C.StageConfig, None, ["train.lr"])
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(C.StageConfig, "nope.yaml")


def test_every_stage_config_has_the_common_fields():
    names = {f.name for f in dataclasses.fields(C.StageConfig)}
    assert {"out_dir", "seed", "resume", "data", "train", "ckpt", "tracker", "model"} <= names
    assert C.StageConfig().train.max_steps > 0
    from weatherkd import stages

    for name in stages.of_kind("train"):  # the engine trains exactly the stages built on StageConfig
        assert issubclass(stages.get(name).config_class, C.StageConfig), name


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    from weatherkd import stages

    shipped = sorted(Path(__file__).resolve().parents[2].glob("configs/*/*.yaml"))
    assert len(shipped) >= 16 and any(p.stem == "allweather" for p in shipped)
    for path in shipped:
        cfg = C.load(stages.get(path.parent.name).config_class, path)
        assert cfg.out_dir, path


@pytest.mark.parametrize("text, where", [("seed: 1\n  out_dir: x\n", ":2:10: invalid YAML: mapping values"),
                                         ("data: [1, 2\n", ":2:1: invalid YAML: expected ','"),
                                         ("seed: !!python/object/apply:os.system ['touch {marker}']\n",
                                          ":1:7: invalid YAML: could not determine a constructor")])
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, where):
    from weatherkd import config as cfgmod
    from weatherkd.recipes.teacher import Config

    marker = tmp_path / "PWNED"
    config = tmp_path / "bad.yaml"
    config.write_text(text.format(marker=marker))
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.load(Config, config)
    assert str(e.value).startswith(f"{config}{where}") and "\n" not in str(e.value)
    assert not marker.exists()


def test_cross_key_checks_run_for_configs_built_in_code_and_after_the_last_override(tmp_path):
    from weatherkd.errors import UserError
    from weatherkd.recipes import teacher

    with pytest.raises(UserError, match="decay_every"):
        C.StageConfig(train=C.TrainConfig(schedule="step"))
    with pytest.raises(UserError, match="w_text"):
        teacher.Config(model=teacher.TeacherModelConfig(arch="transweather"), loss=teacher.LossConfig(w_text=0.1))
    # through load, a state between two overrides is not checked, the result is
    cfg = C.load(C.StageConfig, None, ["train.schedule=step", "train.decay_every=100"])
    assert cfg.train.decay_every == 100
    with pytest.raises(C.ConfigError, match=r"<defaults> \+ overrides: train.schedule: step needs"):
        C.load(C.StageConfig, None, ["train.schedule=step"])
