"""Presets: the shipped envs/*.toml files, the schema, overrides and validation."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from pathlib import Path

import gymnasium as gym
import pytest

from eggroll_rl import presets as presets_mod
from eggroll_rl.presets import (
    SECTIONS,
    Preset,
    PresetError,
    apply_overrides,
    check_env_id,
    default_presets_dir,
    dump_preset,
    list_presets,
    load_preset,
    preset_keys,
    save_preset,
)

REPO_ENVS = Path(__file__).resolve().parent.parent / "envs"
SHIPPED = [
    "Acrobot-v1",
    "Ant-v5",
    "CartPole-v1",
    "HalfCheetah-v5",
    "Hopper-v5",
    "LunarLander-v3",
    "MountainCarContinuous-v0",
    "Pendulum-v1",
    "Swimmer-v5",
    "Walker2d-v5",
]
TARGETS = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "Pendulum-v1": -200.0,
    "MountainCarContinuous-v0": 90.0,
    "LunarLander-v3": 200.0,
    # MuJoCo: the ARS rows of rl-baselines3-zoo's benchmark (issue 13).
    "Swimmer-v5": 355.3,
    "Hopper-v5": 3343.9,
    "HalfCheetah-v5": 4815.2,
    "Walker2d-v5": 2993.6,
    "Ant-v5": 2333.8,
}


# --------------------------------------------------------------------------------------------
# Shipped presets


def test_every_shipped_preset_parses_and_validates() -> None:
    presets = list_presets(REPO_ENVS)
    assert [p.env_id for p in presets] == SHIPPED
    for preset in presets:
        assert preset.source == REPO_ENVS / f"{preset.env_id}.toml"
        assert preset.env_id in gym.registry, preset.env_id
        assert preset.target == TARGETS[preset.env_id]
        assert preset.validate() is preset
        if preset.tuned:
            assert preset.measured.seconds is not None and preset.measured.env_steps is not None


@pytest.mark.parametrize("env_id", SHIPPED)
def test_shipped_preset_is_found_by_default(env_id: str) -> None:
    preset = load_preset(env_id)
    assert not preset.is_default
    assert preset == load_preset(env_id, REPO_ENVS)


def test_preset_envpool_backend_falls_back_to_sync_when_envpool_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preset's own envpool backend becomes sync with one warning; a chosen one still fails."""
    import sys
    import types

    from eggroll_rl.rollout import RolloutFitness
    from eggroll_rl.run import build_trainer

    monkeypatch.setitem(sys.modules, "envpool", types.ModuleType("envpool"))  # "installed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_preset("LunarLander-v3", REPO_ENVS).rollout.backend == "envpool"
    monkeypatch.setitem(sys.modules, "envpool", None)  # not installed
    with pytest.warns(RuntimeWarning) as caught:
        preset = load_preset("LunarLander-v3", REPO_ENVS)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "pip install 'eggroll-rl[envpool]'" in text and "[measured]" in text and "sync" in text
    assert preset.rollout.backend == "sync" and "rollout.backend" not in preset.overridden
    file_preset = presets_mod._read_preset_file(REPO_ENVS / "LunarLander-v3.toml", "LunarLander-v3")
    assert preset == dataclasses.replace(
        file_preset, rollout=dataclasses.replace(file_preset.rollout, backend="sync")
    )
    with warnings.catch_warnings():  # other presets are untouched and do not warn
        warnings.simplefilter("error")
        assert load_preset("CartPole-v1", REPO_ENVS).rollout.backend == "auto"
    # A backend the user chose fails as before, naming the extra.
    chosen = apply_overrides(preset, ["rollout.backend=envpool", "population=4", "hidden_sizes=4"])
    with pytest.raises(ImportError, match=r"pip install 'eggroll-rl\[envpool\]'"):
        build_trainer(chosen)
    with pytest.raises(ImportError, match=r"pip install 'eggroll-rl\[envpool\]'"):
        RolloutFitness("LunarLander-v3", backend="envpool")


def test_shipped_presets_survive_dump_and_reload(tmp_path: Path) -> None:
    for preset in list_presets(REPO_ENVS):
        for only_changed in (False, True):
            path = tmp_path / f"{preset.env_id}.toml"
            path.write_text(dump_preset(preset, only_changed=only_changed))
            assert load_preset(preset.env_id, tmp_path) == preset


# --------------------------------------------------------------------------------------------
# Defaults and schema


def test_env_without_preset_gets_announced_defaults(tmp_path: Path) -> None:
    preset = load_preset("Foo-v0", tmp_path)
    assert preset.is_default and preset.source is None
    assert preset == Preset(env_id="Foo-v0")
    assert preset.target is None  # the env spec's reward_threshold applies


def test_optional_keys_default_to_none_so_toml_omission_round_trips() -> None:
    # TOML has no null: dump_preset omits None and "", so those must be the defaults.
    for cls in (Preset, *SECTIONS.values()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in {"source", "overridden"}:
                continue
            tp = hints[f.name]
            if type(None) in typing.get_args(tp):
                assert f.default is None, f"{cls.__name__}.{f.name}"
            if tp is str and f.name != "env_id":
                assert f.default == "", f"{cls.__name__}.{f.name}"


def test_config_round_trip() -> None:
    preset = apply_overrides(load_preset("CartPole-v1", REPO_ENVS), ["sigma=0.7", "hidden_sizes=16"])
    config = preset.to_config()
    assert config["preset"] == "CartPole-v1.toml"
    assert config["overrides"] == ["trainer.sigma", "policy.hidden_sizes"]
    assert config["policy"]["hidden_sizes"] == [16] and config["trainer"]["sigma"] == 0.7
    assert "measured" not in config and config["version"]
    rebuilt = Preset.from_dict(config)
    assert rebuilt.trainer == preset.trainer and rebuilt.policy == preset.policy
    assert rebuilt.target == preset.target


def test_save_preset_writes_atomically(tmp_path: Path) -> None:
    preset = apply_overrides(
        Preset(env_id="Foo-v0"), ["measured.seconds=1.5", "tuned=true", "measured.env_steps=1000"]
    )
    path = save_preset(preset, tmp_path / "Foo-v0.toml")
    assert load_preset("Foo-v0", tmp_path) == preset
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_presets_dir_from_environment(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "Foo-v0.toml").write_text('env_id = "Foo-v0"\n[trainer]\npopulation = 64\n')
    monkeypatch.setenv(presets_mod.PRESETS_DIR_ENV, str(tmp_path))
    assert default_presets_dir() == tmp_path
    assert load_preset("Foo-v0").trainer.population == 64
    assert [p.env_id for p in list_presets()] == ["Foo-v0"]


# --------------------------------------------------------------------------------------------
# Bad preset files


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("env_id = \n", "invalid TOML"),
        (
            'env_id = "Foo-v0"\n[trainer]\npopulaton = 64\n',
            "unknown key trainer.populaton; did you mean population",
        ),
        ('env_id = "Foo-v0"\n[trainer]\npopulation = "64"\n', "trainer.population: expected an integer"),
        ('env_id = "Foo-v0"\n[trainer]\npopulation = 64.0\n', "expected an integer"),
        ('env_id = "Foo-v0"\n[trainer]\nsigma = 0.0\n', "trainer.sigma: must be > 0"),
        ('env_id = "Bar-v0"\n', "env_id is 'Bar-v0' but the file is for 'Foo-v0'"),
        ('env_id = "Foo-v0"\ntrainer = 3\n', "[trainer] must be a table"),
        ('env_id = "Foo-v0"\n[trainr]\n', "unknown key 'trainr'; did you mean trainer"),
        ('env_id = "Foo-v0"\n[policy]\nhidden_sizes = [64, true]\n', "policy.hidden_sizes"),
        ('env_id = "Foo-v0"\ntuned = true\n', "measured.seconds: is required when tuned"),
    ],
)
def test_bad_preset_file(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "Foo-v0.toml").write_text(text)
    with pytest.raises(PresetError) as info:
        load_preset("Foo-v0", tmp_path)
    message = str(info.value)
    assert fragment in message
    assert "Foo-v0.toml" in message


# --------------------------------------------------------------------------------------------
# Overrides


BASE = Preset(env_id="CartPole-v1")


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("trainer.sigma=0.2", "trainer.sigma", 0.2),
        ("sigma=0.25", "trainer.sigma", 0.25),
        ("lr=1e-3", "trainer.lr", 0.001),
        ("learning_rate=0.5", "trainer.lr", 0.5),
        ("population=256", "trainer.population", 256),
        ("trainer.population= 1_024 ", "trainer.population", 1024),
        ("trainer=vanilla", "trainer.algorithm", "vanilla"),
        ("fitness-shaping=ZScore", "trainer.fitness_shaping", "zscore"),
        ("fitness_shaping=centered-rank", "trainer.fitness_shaping", "centered_rank"),
        ("hidden_sizes=64,64", "policy.hidden_sizes", (64, 64)),
        ("policy.hidden_sizes=(32, 16)", "policy.hidden_sizes", (32, 16)),
        ("hidden_sizes=[8]", "policy.hidden_sizes", (8,)),
        ("hidden_sizes=", "policy.hidden_sizes", ()),
        ("normalize_obs=false", "policy.normalize_obs", False),
        ("normalize-obs=Yes", "policy.normalize_obs", True),
        ("freeze_nonlora=1", "trainer.freeze_nonlora", True),
        ("target=500", "target", 500.0),
        ("target=none", "target", None),
        ("max_episode_steps=200", "rollout.max_episode_steps", 200),
        ("max_episode_steps=null", "rollout.max_episode_steps", None),
        ("train_max_episode_steps=300", "rollout.train_max_episode_steps", 300),
        ("train-max-episode-steps=none", "rollout.train_max_episode_steps", None),
        ("max_seconds=30", "run.max_seconds", 30.0),
        ("generations=5", "trainer.generations", 5),  # the budget, not measured.generations
        ("measured.generations=5", "measured.generations", 5),
        ("notes=a=b", "notes", "a=b"),  # split on the first '=' only
    ],
)
def test_override_coercion(override: str, key: str, value: object) -> None:
    preset = apply_overrides(BASE, [override])
    got = preset.get(key)
    assert got == value and type(got) is type(value)
    assert preset.overridden == (key,)


def test_overrides_leave_the_original_untouched() -> None:
    before = dataclasses.replace(BASE)
    preset = apply_overrides(BASE, ["sigma=0.3", "hidden_sizes=8"])
    assert before == BASE and BASE.overridden == ()
    assert preset != BASE and preset.trainer.sigma == 0.3
    assert apply_overrides(preset, ["sigma=0.4"]).overridden == (
        "trainer.sigma",
        "policy.hidden_sizes",
    )


def test_typed_overrides_from_flags() -> None:
    preset = apply_overrides(
        BASE,
        {
            "population": 64,
            "trainer.sigma": 1,
            "target": 475,
            "hidden_sizes": [4, 4],
            "normalize_obs": False,
            "rank": "4",
        },
    )
    assert preset.trainer.population == 64
    assert preset.trainer.sigma == 1.0 and isinstance(preset.trainer.sigma, float)
    assert preset.target == 475.0
    assert preset.policy.hidden_sizes == (4, 4)
    assert preset.policy.normalize_obs is False
    assert preset.trainer.rank == 4


def test_overrides_apply_together_before_validation() -> None:
    # group_size=15 alone breaks divisibility and the antithetic pairing; together they are consistent.
    preset = apply_overrides(BASE, ["population=30", "noise_reuse=0", "group_size=15"])
    assert (preset.trainer.population, preset.trainer.noise_reuse, preset.trainer.group_size) == (30, 0, 15)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("sigmaa=0.1", "unknown key 'sigmaa'; did you mean sigma"),
        ("trainer.sigam=0.1", "did you mean trainer.sigma"),
        ("polcy.hidden_sizes=8", "did you mean policy.hidden_sizes"),
        ("zzzz=1", "unknown key 'zzzz'"),
        ("sigma", "is not key=value"),
        ("=3", "is not key=value"),
        ("env_id=Acrobot-v1", "env_id cannot be overridden"),
        ("population=abc", "trainer.population: expected an integer, got 'abc'"),
        ("population=12.5", "trainer.population: expected an integer"),
        ("sigma=big", "trainer.sigma: expected a number, got 'big'"),
        ("normalize_obs=maybe", "policy.normalize_obs: expected true or false"),
        ("hidden_sizes=64,x", "policy.hidden_sizes: expected a list of integers"),
        (
            "optimizer=adamm",
            "trainer.optimizer: expected one of sgd, adam, adamw, got 'adamm' (did you mean adam?)",
        ),
        ("target=high", "target: expected a number or none"),
        ("population=1", "trainer.population: must be >= 2, got 1"),
        ("population=129", "trainer.population: must be divisible by trainer.noise_reuse = 2"),
        ("sigma=0", "trainer.sigma: must be > 0"),
        ("sigma=-0.1", "trainer.sigma: must be > 0"),
        ("sigma=nan", "trainer.sigma: must be > 0"),
        ("lr=0", "trainer.lr: must be > 0"),
        ("rank=0", "trainer.rank: must be >= 1"),
        ("noise_reuse=1", "trainer.noise_reuse: must be 0 (independent members) or 2"),
        ("noise_reuse=3", "trainer.noise_reuse: must be 0 (independent members) or 2"),
        ("group_size=3", "trainer.population: must be divisible by trainer.group_size = 3"),
        ("group_size=1", "trainer.group_size: must be 0"),
        ("weight_decay=-1", "trainer.weight_decay: must be >= 0"),
        ("generations=0", "trainer.generations: must be >= 1"),
        ("seed=-1", "trainer.seed"),
        ("lr_decay=1.5", "trainer.lr_decay: must be in (0, 1]"),
        ("episodes_per_member=0", "rollout.episodes_per_member: must be >= 1"),
        ("max_episode_steps=0", "rollout.max_episode_steps: must be >= 1"),
        ("train_max_episode_steps=0", "rollout.train_max_episode_steps: must be >= 1 or none, got 0"),
        ("train_max_episode_steps=1.5", "rollout.train_max_episode_steps: expected an integer or none"),
        ("hidden_sizes=64,0", "policy.hidden_sizes: every layer"),
        ("eval.every=-1", "eval.every: must be >= 0"),
        ("eval.stop_margin_se=-1", "eval.stop_margin_se: must be a finite number >= 0"),
        ("eval.stop_margin_se=inf", "eval.stop_margin_se: must be a finite number >= 0"),
        ("episodes=0", "eval.episodes: must be >= 1"),
        ("max_seconds=0", "run.max_seconds: must be > 0"),
        ("target=inf", "target: must be a finite number"),
        ("tuned=true", "measured.seconds: is required when tuned = true"),
        ("device=tpu", "run.device: expected one of auto, cpu, cuda"),
    ],
)
def test_override_errors(override: str, fragment: str) -> None:
    with pytest.raises(PresetError) as info:
        apply_overrides(BASE, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_group_size_must_keep_antithetic_pairs_together() -> None:
    with pytest.raises(
        PresetError, match=r"trainer\.group_size: must be a multiple of trainer\.noise_reuse = 2"
    ):
        apply_overrides(BASE, ["population=96", "group_size=3"])
    assert apply_overrides(BASE, ["population=96", "group_size=6"]).trainer.group_size == 6


def test_typed_override_of_wrong_type() -> None:
    with pytest.raises(PresetError, match=r"trainer\.population: expected an integer, got 1\.5"):
        apply_overrides(BASE, {"population": 1.5})
    with pytest.raises(PresetError, match=r"policy\.normalize_obs: expected true or false, got 1"):
        apply_overrides(BASE, {"normalize_obs": 1})


def test_bare_keys_are_unambiguous_among_run_sections() -> None:
    # Bare keys (`--set sigma=0.2`) must name one field; a new field that collides with an
    # existing one in another run section would silently change what a bare key means.
    leaves = [k.partition(".")[2] for k in preset_keys(include_measured=False) if "." in k]
    assert len(leaves) == len(set(leaves))


# --------------------------------------------------------------------------------------------
# Env ids


def test_check_env_id() -> None:
    check_env_id("CartPole-v1")
    expected = "unknown environment 'CartPole-v9'; did you mean CartPole-v1"
    with pytest.raises(PresetError, match=expected):
        check_env_id("CartPole-v9")
    with pytest.raises(PresetError, match=r"did you mean .*LunarLander-v3"):
        check_env_id("lunarlander-v3")


def test_schema_choices_match_the_library() -> None:
    core = pytest.importorskip("eggroll_rl.core")
    policies = pytest.importorskip("eggroll_rl.policies")
    rollout = pytest.importorskip("eggroll_rl.rollout")
    shaping = pytest.importorskip("eggroll_rl.shaping")

    def choices(cls: type, name: str) -> set[str]:
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    assert choices(presets_mod.PolicySettings, "activation") == set(policies.ACTIVATIONS)
    assert choices(presets_mod.RolloutSettings, "backend") == set(rollout.BACKENDS)
    assert choices(presets_mod.RolloutSettings, "crn") == set(rollout.CRN_MODES)
    assert choices(presets_mod.TrainerSettings, "optimizer") == set(core.OPTIMIZERS)
    assert choices(presets_mod.TrainerSettings, "fitness_shaping") == set(shaping.SHAPERS)
