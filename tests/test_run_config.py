"""The run config's declarations: one per field, and validation, node widgets and CLI help all built from them."""
import dataclasses
import typing

import pytest
import torch

from pack_loader import load_pack
from trainers.cli.main import main as cli_main
from trainers.core import config
from trainers.core.config import GROUPS, ConfigError, TrainConfig
from trainers.methods import registry as methods
from trainers.training import optim

FIELDS = dataclasses.fields(TrainConfig)
TRAINER_NODES = ("PersonalizeTrainLoRA", "PersonalizeTrainTextualInversion", "PersonalizeTrainDreamBooth")


def test_every_field_is_declared_once_with_help_a_group_and_a_default_that_passes():
    hints = typing.get_type_hints(TrainConfig)
    for f in FIELDS:
        meta = f.metadata
        assert meta["help"].strip() and meta["group"] in ("", *GROUPS), f.name
        default = config.default_of(f.name)
        assert isinstance(default, hints[f.name]), f.name
        if meta["choices"]:
            assert default in meta["choices"], f.name
        if meta["lo"] is not None:
            assert meta["lo"] <= default <= meta["hi"], f.name


def test_choices_are_the_engines_own():
    assert set(config.choices("method")) == set(methods.METHODS)
    assert config.choices("optimizer") == optim.OPTIMIZERS
    assert config.choices("lr_scheduler") == optim.SCHEDULES
    with pytest.raises(ValueError, match="optimizer 'sgd' is not one of"):
        optim.make_optimizer("sgd", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], 0.0,
                             torch.device("cpu"))
    with pytest.raises(ValueError, match="lr_scheduler 'step' is not one of"):
        optim.make_scheduler("step", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0, 10)


@pytest.mark.parametrize("node", TRAINER_NODES)
def test_trainer_widgets_come_from_the_declarations(node):
    spec = load_pack().NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    declared = {f.name: f for f in FIELDS}
    widgets = [name for name in inputs if name in declared and name != "dataset"]  # dataset: a DATASET link
    assert len(widgets) >= 20
    for name in widgets:
        kind, options = inputs[name]
        meta = declared[name].metadata
        if meta["choices"]:
            assert kind and set(kind) <= set(meta["choices"]), name
        else:
            assert kind == {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}[typing.get_type_hints(
                TrainConfig)[name]], name
        assert options.get("min") == meta["lo"] and options.get("max") == meta["hi"], name
        if name not in ("trigger_word", "unet_lr"):  # tooltips a node words for itself
            assert options["tooltip"] == meta["help"], name
        valid = {"base_model": "m", "dataset": "d", "trigger_word": "sks", "init_word": "dog", "class_prompt": "x"}
        TrainConfig(**{**valid, name: options["default"]}).validate()  # every node default is a valid value


def test_each_trainer_shows_its_own_group_only():
    pack = load_pack().NODE_CLASS_MAPPINGS
    names = {node: {**pack[node].INPUT_TYPES()["required"], **pack[node].INPUT_TYPES()["optional"]}
             for node in TRAINER_NODES}
    assert not set(config.fields_of("textual_inversion")) & set(names["PersonalizeTrainLoRA"])
    assert not {"rank", "network", "preset", "unet_lr"} & set(names["PersonalizeTrainTextualInversion"])
    assert set(config.fields_of("textual_inversion")) <= set(names["PersonalizeTrainTextualInversion"])
    assert not set(config.fields_of("dreambooth")) & set(names["PersonalizeTrainLoRA"])
    assert set(config.fields_of("dreambooth")) <= set(names["PersonalizeTrainDreamBooth"])
    assert names["PersonalizeTrainDreamBooth"]["method"][0] == ["dreambooth", "dreambooth_lora"]


@pytest.mark.parametrize("settings,message", [
    ({"network": "lycoris"}, "lora.network='lycoris' is not one of lora, loha, lokr"),
    ({"rank": 0}, "lora.rank must be at least 1"),
    ({"num_vectors": 99}, "textual_inversion.num_vectors must be at most 16"),
    ({"optimizer": "sgd"}, "optimizer='sgd' is not one of adamw, adamw8bit, prodigy"),
    ({"resolution": 32}, "resolution 32 must be a multiple of 8 and at least 64"),
    ({"resolution": 100}, "resolution 100 must be a multiple of 8"),
])
def test_a_bad_value_is_an_error_naming_the_field_where_it_sits(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base_model="m", dataset="d", **settings).validate()


def test_cli_help_lists_every_setting_with_its_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in FIELDS:
        assert f"{f.name} (" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert 'textual_inversion settings (JSON: {"textual_inversion": {...}})' in text
