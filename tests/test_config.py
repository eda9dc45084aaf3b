"""Every option of every config group composes; bad keys, types and options fail by name."""

import pytest
from conftest import CONF, compose_config
from hydra.utils import get_class
from omegaconf import OmegaConf

from clrun.config import check_config, check_known_keys
from clrun.errors import ClrunError
from clrun.run import identity, run_name

GROUPS = ("method", "backbone", "stream", "hardware")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_compose():
    cfg = compose_config()
    assert (cfg.method.name, cfg.backbone.name, cfg.stream.name, cfg.hardware.name) == (
        "finetune",
        "convnet",
        "synthetic",
        "auto",
    )
    assert cfg.resume is True


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group].name == option
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_expected_options_exist():
    methods = {"finetune", "scratch", "joint", "ewc", "online_ewc", "si", "mas", "lwf", "er", "hn", "pah"}
    assert methods <= set(options("method"))
    assert {"mlp", "convnet", "vgg16_bn", "resnet18", "resnet50", "sphereface20"} <= set(options("backbone"))
    assert {
        "synthetic",
        "split_mnist",
        "permuted_mnist",
        "rotated_mnist",
        "cifar10_5",
        "cifar100_10",
        "cifar100_20",
    } <= set(options("stream"))
    assert {"cpu", "gpu", "auto"} <= set(options("hardware"))


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="lr_typo"):
        compose_config("method.train.lr_typo=0.1")
    # Hydra's `+` force-adds keys into typed nodes; clrun refuses them before any work
    for override, key in [
        ("+method.train.learning_rate=0.1", "method.train.learning_rate"),
        ("+stream.nope=1", "stream.nope"),
        ("+extra=1", "extra"),
    ]:
        with pytest.raises(ClrunError, match=f"unknown config key {key};"):
            check_known_keys(compose_config(override))
    check_known_keys(compose_config("stream=rotated_mnist", "backbone=mlp", "method=joint"))


def composition_error(*overrides: str) -> str:
    """The message Hydra prints for a failed composition (the error and its cause)."""
    with pytest.raises(Exception) as info:
        compose_config(*overrides)
    return f"{info.value}\n{info.value.__cause__}"


def test_bad_type_fails_naming_key():
    message = composition_error("method.train.epochs=many")
    assert "method.train.epochs" in message and "many" in message


def test_bad_choice_value_lists_valid_ones():
    message = composition_error("method.train.optimizer=lbfgs")
    assert "lbfgs" in message and "sgd, adam, adamw" in message


def test_unknown_option_lists_choices():
    message = composition_error("method=nonexistent")
    assert "nonexistent" in message and all(name in message for name in ("finetune", "joint", "scratch"))


def test_data_root_comes_from_env(monkeypatch):
    monkeypatch.setenv("CLRUN_DATA", "/some/where")
    assert compose_config().data.root == "/some/where"
    monkeypatch.delenv("CLRUN_DATA")
    assert compose_config().data.root.endswith("clrun/data")


def test_run_name_depends_on_results_config_only():
    base = run_name(compose_config())
    assert base.startswith("finetune-synthetic-convnet-seed0-")
    assert run_name(compose_config("resume=false", "data.root=/x")) == base
    assert run_name(compose_config("method.train.lr=0.02")) != base
    assert run_name(compose_config("seed=1")) != base
    # stream.task_views joins the identity only when set: runs made before the key keep their folders
    assert "task_views" not in identity(compose_config())["stream"]
    cpg = identity(compose_config("stream=cpg_fine_grained"))["stream"]["task_views"]
    assert cpg["cubs_cropped"] == {"resize": "stretch", "image_size": [224, 224], "crop": "none"}


@pytest.mark.parametrize(
    "override",
    [
        "method.train.batch_size=0",
        "method.train.epochs=0",
        "method.train.lr=-1",
        "method.eval_batch_size=0",
        "backbone.width=-0.5",
        "stream.n_tasks=0",
        "hardware.threads=0",
    ],
)
def test_out_of_range_values_fail_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ClrunError, match=f"^{key}=.* is invalid: it must be"):
        check_config(compose_config(override))


VDV_PRESETS = [f"vdv_{p}_{s}" for p in ("split_mnist", "permuted_mnist") for s in ("task", "domain", "class")]


@pytest.mark.parametrize("preset", VDV_PRESETS)
def test_every_method_composes_with_the_scenario_presets(preset):
    scenario = preset.rsplit("_", 1)[1]
    for method in options("method"):
        cfg = compose_config(f"experiment={preset}", f"method={method}")
        assert cfg.method.train.iterations == (2000 if "split" in preset else 5000)
        assert cfg.stream.scenario.value == scenario
        method_class = get_class(cfg.method._target_)
        if scenario in method_class.supported_scenarios(cfg.method):
            assert check_config(cfg) is method_class
        else:  # e.g. cpg in the class scenario: refused before any work
            with pytest.raises(ClrunError, match=f"method {method} does not support stream.scenario={scenario}"):
                check_config(cfg)


def test_tuning_files_name_a_method_and_a_preset_and_apply():
    presets = set(options("experiment"))
    for path in (CONF / "tuning").glob("*.yaml"):
        method = next(
            m for m in options("method") if path.stem.startswith(f"{m}_vdv_") or path.stem.startswith(f"{m}_pah_")
        )
        assert path.stem[len(method) + 1 :] in presets, path.name
    cfg = compose_config("experiment=vdv_split_mnist_class", "method=ewc")
    assert cfg.method.ewc_lambda == 1e8  # van de Ven's class-IL value, not the method's default
    assert (
        compose_config("experiment=vdv_split_mnist_class", "method=ewc", "method.ewc_lambda=3").method.ewc_lambda == 3
    )
    assert compose_config("experiment=vdv_split_mnist_class", "method=scratch").method.task_id.value == "entropy"
    assert compose_config("method=scratch").method.task_id.value == "none"
    pah = compose_config("experiment=pah_split_cifar100")
    assert (pah.method.name, pah.stream.name, pah.stream.split.value, pah.stream.augment) == (
        "pah",
        "cifar100_10",
        "contiguous",
        False,
    )
    # the released code's setup: torchvision's ImageNet ResNet-18, its KD, 0.5 normalisation (TinyImageNet: ImageNet's)
    code = ("imagenet", "imagenet", "code", "adamw", 15, 64)  # kd: pah's default
    for preset, normalize, tasks in [
        ("pah_split_cifar100", "half", (10, 10)),
        ("pah_tiny_imagenet_10", "imagenet", (10, 20)),
        ("pah_tiny_imagenet_20", "imagenet", (20, 10)),
    ]:
        cfg = compose_config(f"experiment={preset}")
        train = cfg.method.train
        got = (
            cfg.backbone.stem.value,
            cfg.backbone.pretrained,
            cfg.method.kd.value,
            train.optimizer.value,
            train.epochs,
            train.batch_size,
        )
        assert got == code and cfg.stream.normalize.value == normalize, preset
        assert (cfg.stream.n_tasks, cfg.stream.classes_per_task) == tasks, preset
