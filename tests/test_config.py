"""Config: TOML loading, overrides, validation messages, round trip and a pinned hash."""

import json
import re

import pytest

from ntk_tickets import (
    StudyConfig,
    TrainConfig,
    UserInputError,
    config_from_dict,
    config_hash,
    config_to_dict,
    load_config,
    parse_override,
    with_overrides,
)
from ntk_tickets.config import (
    DataConfig,
    ModelConfig,
    TicketsConfig,
    differing_fields,
    identity_hash,
    study_identity,
)

STUDY_TOML = """
name = "probe"
paths = ["exact", "linear"]
[data]
name = "teacher"
n_train = 64
[model]
widths = [16, 64]
w_std = 1
[train]
steps = 50
seeds = [0, 1, 2]
[tickets]
rounds = 3
"""


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY_TOML)
    return path


def test_toml_is_loaded_into_typed_frozen_sections(study_file):
    cfg = load_config(study_file)
    assert cfg.data.name == "teacher" and cfg.data.n_train == 64
    assert cfg.model.widths == (16, 64)
    assert cfg.model.w_std == 1.0 and isinstance(cfg.model.w_std, float)
    assert cfg.train.seeds == (0, 1, 2)
    assert cfg.tickets.rounds == 3
    assert cfg.paths == ("exact", "linear")
    with pytest.raises(AttributeError):
        cfg.train.steps = 3


def test_overrides_take_toml_values_and_bare_strings(study_file):
    cfg = load_config(study_file, ["model.widths=[8, 32]", "train.steps=7",
                                   "data.name=sine", "train.x64=true", "name='other'"])
    assert cfg.model.widths == (8, 32)
    assert cfg.train.steps == 7
    assert cfg.data.name == "sine"
    assert cfg.train.x64 is True
    assert cfg.name == "other"


def test_override_can_add_a_missing_section():
    cfg = with_overrides(StudyConfig(), ["tickets.rounds=2"])
    assert cfg.tickets.rounds == 2
    assert StudyConfig().tickets is None


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=abc", "train.steps must be an integer"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("train.learning_rate=true", "train.learning_rate must be a number"),
    ("train.loss=l1", "train.loss = 'l1' is not allowed; choose one of 'mse', 'xent'"),
    ("model.widths=64", "model.widths must be a list"),
    ("model.widths=[64, 0]", "model.widths must be >= 1, got (64, 0)"),
    ("model.widths=[16, 16]", "model.widths lists 16 more than once"),
    ("train.seeds=[0, 0]", "train.seeds lists 0 more than once"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number, got nan"),
    ("model.w_std=inf", "model.w_std must be a finite number, got inf"),
    ("train.momentum=nan", "train.momentum must be a finite number"),
    ("data.noise=nan", "data.noise must be a finite number"),
    ("name='/abs/path'", "name = '/abs/path' must be a plain name"),
    ("name='a/../b'", "must be a plain name"),
    ("name='..'", "must be a plain name"),
    ("train.seeds=[]", "train.seeds must not be empty"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("paths=['exact', 'lin']", "paths = 'lin' is not allowed; choose one of 'exact', 'linear'"),
    ("metrics=['loss', 'loss']", "metrics lists 'loss' more than once"),
    ("tickets.controls=['random', 'clone']", "tickets.controls = 'clone' is not allowed"),
    ("tickets.perturb_eps=[0.1, inf]", "tickets.perturb_eps[1] must be a finite number"),
    ("tickets.prune_fraction=1.0", "tickets.prune_fraction must be in [0, 1)"),
    ("tickets.rewind_step=100", "tickets.rewind_step (100) is after the last training step"),
    ("tickets.rewind_step=[0, 60]", "tickets.rewind_step (60) is after the last training step"),
    ("tickets.rewind_step=[0, 0]", "tickets.rewind_step lists 0 more than once"),
    ("stability.spawn_steps=[0, 5]", "full batch does not have: set train.batch_size > 0"),
    ("stability.n_interp=1", "stability.n_interp must be >= 2"),
    ("subspace.kinds=['fourier']", "subspace.kinds = 'fourier' is not allowed"),
    ("subspace.dims=[0]", "subspace.dims must be >= 1"),
    ("subspace.start_step=51", "subspace.start_step (51) is after the last training step"),
    ("subspace.kinds=['lottery']", "raise subspace.snapshots (now 128) to >= 256"),
    ("data.name=npz", "data.path is required"),
    ("train.loss=xent", "needs a classification dataset"),
    ("train.batch_size=100", "train.batch_size (100) exceeds data.n_train (64)"),
    ("train.steps.max=3", "train.steps is a value, not a section"),
    ("steps", "is not of the form dotted.key=value"),
    ("data=3", "[data] must be a table"),
])
def test_bad_values_name_the_field(study_file, override, fragment):
    with pytest.raises(UserInputError) as info:
        load_config(study_file, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.batch_size=16", "stability.spawn_steps=[0, 60]"],
     "stability.spawn_steps [60] are after the last training step"),
    (["subspace.kinds=['lottery']", "subspace.dims=[8]", "subspace.snapshots=64"],
     "subspace.snapshots (64) exceeds the 50 steps from subspace.start_step"),
    (["subspace.kinds=['axis_imp']", "tickets.method='snip'"],
     "subspace kind 'axis_imp' takes the IMP masks"),
    (["subspace.dims=[4]", "model.parameterization='mup'"], "µP's per-layer rates"),
    (["stability.spawn_steps=[0]", "train.batch_size=8", "paths=['entk']",
      "tickets.eval_paths=['exact']"], "tickets section trains the 'exact' path"),
])
def test_bad_stability_and_subspace_sections(study_file, overrides, fragment):
    with pytest.raises(UserInputError) as info:
        load_config(study_file, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_rewind_step_takes_one_value_or_a_list(study_file):
    from ntk_tickets.config import rewind_steps

    assert rewind_steps(load_config(study_file).tickets) == (0,)
    swept = load_config(study_file, ["tickets.rewind_step=[8, 0, 2]"]).tickets
    assert swept.rewind_step == (8, 0, 2) and rewind_steps(swept) == (8, 0, 2)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(UserInputError, match="nope.toml' does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(UserInputError, match="bad.toml' is not valid TOML"):
        load_config(bad)


def test_round_trip_through_json_is_identity(study_file):
    cfg = load_config(study_file)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_hash_is_stable_and_sensitive():
    # Pinned: a change here means every stored run identity changes. Update deliberately.
    assert config_hash(StudyConfig()) == "10ff9e18a759"
    assert config_hash(with_overrides(StudyConfig(), ["train.steps=999"])) != config_hash(
        StudyConfig())


def test_study_identity_ignores_only_the_fields_that_enumerate_cells():
    base = config_to_dict(StudyConfig())
    grown = config_to_dict(with_overrides(StudyConfig(), [
        "model.widths=[8, 16]", "train.seeds=[0, 1, 2]", "name=other"]))
    assert identity_hash(grown) == identity_hash(base)
    changed = config_to_dict(with_overrides(StudyConfig(), ["train.steps=7", "model.depth=3"]))
    assert identity_hash(changed) != identity_hash(base)
    assert differing_fields(study_identity(base), study_identity(changed)) == [
        "model.depth", "train.steps"]


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(UserInputError, match="latin1.toml' is not UTF-8 text"):
        load_config(bad)


def test_parse_override_examples():
    assert parse_override("model.widths=[64, 256]") == (["model", "widths"], [64, 256])
    assert parse_override("train.learning_rate=1e-3") == (["train", "learning_rate"], 0.001)
    assert parse_override("data.name=digits") == (["data", "name"], "digits")


def test_direct_construction_is_also_validated():
    with pytest.raises(UserInputError, match="train.seeds must not be empty"):
        StudyConfig(train=TrainConfig(seeds=()))


@pytest.mark.parametrize("build, fragment", [
    (lambda: TrainConfig(optimizer="bogus"), "train.optimizer = 'bogus' is not allowed"),
    (lambda: TrainConfig(steps=-5), "train.steps must be >= 1, got -5"),
    (lambda: TrainConfig(learning_rate=float("nan")), "train.learning_rate must be a finite"),
    (lambda: TrainConfig(seeds=[0, 0]), "train.seeds lists 0 more than once"),
    (lambda: ModelConfig(arch="bogus"), "model.arch = 'bogus' is not allowed"),
    (lambda: ModelConfig(widths=[16, 16]), "model.widths lists 16 more than once"),
    (lambda: ModelConfig(depth=2.0), "model.depth must be an integer"),
    (lambda: DataConfig(name="bogus"), "data.name = 'bogus' is not allowed"),
    (lambda: TicketsConfig(method="bogus"), "tickets.method = 'bogus' is not allowed"),
    (lambda: StudyConfig(metrics=("bogus",)), "metrics = 'bogus' is not allowed"),
    (lambda: StudyConfig(name="/tmp/x"), "must be a plain name"),
    (lambda: StudyConfig(model={"widths": [1]}), "model must be a ModelConfig"),
    (lambda: TicketsConfig(prune_fraction=1.0), "tickets.prune_fraction must be in [0, 1)"),
    (lambda: TicketsConfig(output_prune_fraction=-0.5), "or -1 (the same as prune_fraction)"),
])
def test_python_construction_validates_every_section(build, fragment):
    with pytest.raises(UserInputError, match=re.escape(fragment)):
        build()


def test_python_construction_normalises_lists_to_tuples():
    model = ModelConfig(widths=[16, 32])
    assert model.widths == (16, 32) and isinstance(model.widths, tuple)
    assert TrainConfig(learning_rate=1).learning_rate == 1.0
    hash(StudyConfig(model=model))  # hashable: usable as a cache key


def test_registries_answer_membership_like_mappings():
    from ntk_tickets.metrics import METRICS

    assert "loss" in METRICS and "bogus" not in METRICS
    assert METRICS.get("bogus") is None and METRICS.get("loss") is METRICS["loss"]
    with pytest.raises(UserInputError, match="metrics = 'bogus' is not allowed"):
        METRICS["bogus"]
