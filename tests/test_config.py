"""Config loading: defaults, YAML files, dotted overrides, and error messages that name the key
and where it came from."""
from __future__ import annotations

from pathlib import Path

import pytest

from ldm_train.config import Config, ConfigError, dump_config, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.run.dir == "runs/demo"
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert len(cfg.model.block_out_channels) == len(cfg.model.attention_levels)
    assert cfg.path(cfg.autoencoder.path) == Path("runs/demo/vae")


def test_repo_has_config_files():
    assert REPO / "configs" / "micro.yaml" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_micro_config_values():
    cfg = load_config(REPO / "configs" / "micro.yaml")
    assert cfg.run.dir == "runs/micro"
    assert cfg.autoencoder.block_out_channels == [8, 16]
    assert cfg.autoencoder.train.crop is None
    assert cfg.eval.prompts == []
    assert cfg.train.steps == 6 and cfg.train.checkpoint_every == 3
    # keys the file leaves out keep their defaults
    assert cfg.diffusion == Config().diffusion


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  stepz: 6\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.stepz" in msg
    assert "unknown key" in msg
    assert str(path) in msg
    assert "command-line override" not in msg


def test_unknown_section_in_file(tmp_path):
    path = write(tmp_path, "trian:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, 'train: {steps: "many"}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.steps" in msg
    assert "'many'" in msg
    assert str(path) in msg


def test_out_of_range_value_in_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(path)


def test_several_errors_are_all_reported(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 1\nmodel:\n  dropout: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.stepz" in msg and "model.dropout" in msg


def test_unknown_key_via_override(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.stepz=6"])
    msg = str(info.value)
    assert "train.stepz" in msg and "unknown key" in msg
    assert "command-line override" in msg
    assert str(path) not in msg


def test_wrong_type_via_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=many"])
    msg = str(info.value)
    assert "train.steps" in msg and "'many'" in msg
    assert "command-line override" in msg


def test_error_origin_distinguishes_file_and_override(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.dropoot=0.1"])
    lines = str(info.value).splitlines()
    (file_line,) = [line for line in lines if "train.stepz" in line]
    (override_line,) = [line for line in lines if "model.dropoot" in line]
    assert str(path) in file_line and "command-line override" not in file_line
    assert "command-line override" in override_line and str(path) not in override_line


@pytest.mark.parametrize("override", ["trian.steps=5", "model.attention_levels=[true, 1]"])
def test_override_origin_for_sections_and_list_items(override):
    with pytest.raises(ConfigError, match="command-line override"):
        load_config(None, [override])


def test_lr_override_parses_to_float():
    cfg = load_config(None, ["train.lr=1e-4"])
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == 1e-4
    assert parse_override("train.lr=2.5E-3") == ("train.lr", 2.5e-3)


def test_override_values_are_yaml():
    cfg = load_config(
        None,
        ["train.steps=7", "model.attention_levels=[false, true, false]", "autoencoder.train.crop=null", "run.dir=runs/x"],
    )
    assert cfg.train.steps == 7
    assert cfg.model.attention_levels == [False, True, False]
    assert cfg.autoencoder.train.crop is None
    assert cfg.run.dir == "runs/x"


def test_override_beats_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  lr: 0.01\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.train.steps == 9 and cfg.train.lr == 0.01


@pytest.mark.parametrize("bad", ["train.lr", "=5"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_override_into_a_value_is_refused(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(path, ["train.steps.x=1"])


def test_int_accepted_for_float(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1\n  optimizer:\n    betas: [0, 1]\ndiffusion:\n  beta_end: 1\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    betas = cfg.train.optimizer.betas
    assert betas == [0.0, 1.0] and all(isinstance(b, float) for b in betas)
    assert isinstance(cfg.diffusion.beta_end, float)
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


def test_yaml_1e_minus_4_without_dot_is_a_float(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\n")  # PyYAML reads this as a string
    assert load_config(path).train.lr == 1e-4


def test_float_is_not_accepted_for_int(tmp_path):
    path = write(tmp_path, "train:\n  steps: 2.5\n")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("source", [None, REPO / "configs" / "micro.yaml"], ids=["defaults", "micro"])
def test_dump_then_load_round_trips(tmp_path, source):
    cfg = load_config(
        source, ["train.lr=3e-4", "autoencoder.train.kl_weight=1e-6", "eval.prompts=[a cat, '1.5x']", "run.dir=somewhere"]
    )
    path = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.train.lr == 3e-4


def test_path_expands_run():
    cfg = load_config(None, ["run.dir=/tmp/r1"])
    assert cfg.path(cfg.latents.dir) == Path("/tmp/r1/latents")
    assert cfg.shards("pipe:cat {run}/x.tar") == "pipe:cat /tmp/r1/x.tar"


def test_sections_refuse_bad_assignment():
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.train.steps = "many"


def test_quoted_number_stays_a_string_in_string_fields(tmp_path):
    path = write(tmp_path, 'run:\n  dir: "2.5"\neval:\n  prompts: ["1.5", "red heart"]\n')
    cfg = load_config(path)
    assert cfg.run.dir == "2.5"
    assert cfg.eval.prompts == ["1.5", "red heart"]


def test_demo_yaml_is_the_defaults():
    """configs/demo.yaml documents the defaults; it must not drift from the schema."""
    assert load_config(REPO / "configs" / "demo.yaml") == load_config(None)


# -- keys that moved into nested sections (diffusion.loss.*, eval.samplers.*, eval.metrics.*, ...) ----
OLD_LAYOUT = """
diffusion:
  loss_weighting: min_snr
  min_snr_gamma: 3.0
  learned_variance: false
  formulation: ve_sde
  prediction_type: epsilon
  sigma_min: 0.02
  sde_beta_max: 15.0
  objective: ssm_vr
eval:
  sampler: pc
  eta: 0.0
  spacing: trailing
  snr: 0.2
  pc_corrector: none
  inception_weights: /w/inception.pth
  clip_model: ViT-B-16
"""


def test_moved_keys_are_refused_naming_their_new_place(tmp_path):
    path = write(tmp_path, OLD_LAYOUT)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    for line in ("diffusion.loss_weighting: moved to diffusion.loss.weighting",
                 "diffusion.sigma_min: moved to diffusion.sde.sigma_min and diffusion.ncsn.sigma_min",
                 "eval.spacing: moved to eval.samplers.ddim.spacing and eval.samplers.ddpm.spacing",
                 "eval.inception_weights: moved to eval.metrics.inception_weights"):
        assert line in msg and str(path) in msg
    with pytest.raises(ConfigError, match=r"eval.eta: moved to eval.samplers.ddim.eta  \[in command-line override\]"):
        load_config(None, ["eval.eta=1.0"])
    with pytest.raises(ConfigError, match="'iddpm' was an alias of 'ddpm'"):
        load_config(None, ["eval.sampler=iddpm"])


def test_old_run_config_is_read_with_its_keys_moved(tmp_path):
    cfg = load_config(write(tmp_path, OLD_LAYOUT), migrate_old=True)
    d, e = cfg.diffusion, cfg.eval
    assert d.loss.weighting == "min_snr" and d.loss.min_snr_gamma == 3.0 and not d.iddpm.learned_variance
    assert d.sde.sigma_min == 0.02 and d.ncsn.sigma_min == 0.02 and d.sde.beta_max == 15.0
    assert d.score_matching.objective == "ssm_vr"
    assert e.metrics.inception_weights == "/w/inception.pth" and e.metrics.clip_model == "ViT-B-16"
    # sampler settings at their old defaults stay defaults; the others move to each sampler that used them
    assert e.samplers == {"ddim": {"spacing": "trailing"}, "ddpm": {"spacing": "trailing"},
                          "pc": {"snr": 0.2, "corrector": "none"}}
    assert load_config(write(tmp_path, "eval:\n  sampler: iddpm\n", "b.yaml"), migrate_old=True).eval.sampler == "ddpm"


def test_a_full_old_default_config_migrates_to_todays_defaults(tmp_path):
    """Every config.yaml written before the move spelled out every key: read back it equals the
    defaults, so a run started before the move resumes (record_config compares equal)."""
    old_dump = {
        "diffusion": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "rescale_betas_zero_snr": False, "prediction_type": "v_prediction",
                      "cond_drop_prob": 0.1, "loss_weighting": "uniform", "min_snr_gamma": 5.0, "sigma_data": 0.5,
                      "offset_noise": 0.0, "timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                      "learned_variance": False, "vlb_weight": 0.001, "formulation": "ddpm", "objective": "dsm",
                      "sde_beta_min": 0.1, "sde_beta_max": 20.0, "sigma_min": 0.01, "sigma_max": 50.0,
                      "num_scales": 232, "n_projections": 1, "t_eps": 1e-5},
        "eval": {"sampler": "ddim", "steps": 50, "eta": 0.0, "spacing": "leading", "s_churn": 0.0,
                 "pc_predictor": "reverse_diffusion", "pc_corrector": "langevin", "snr": 0.16, "n_corrector": 1,
                 "langevin_steps_per_sigma": 5, "langevin_step_lr": 2e-5, "inception_weights": None,
                 "fid_feature": 2048, "fid_resize": "tf1_bilinear", "fid_reference_dir": "{run}/eval/fid_reference",
                 "kid_subset_size": 1000, "kid_subsets": 100, "clip_model": "ViT-B-32", "clip_weights": None,
                 "guidance_scale": 3.0, "guidance_sweep": [], "seed": 0, "samples_per_prompt": 4, "batch_size": 64},
    }
    import yaml

    path = write(tmp_path, yaml.safe_dump(old_dump))
    today = Config()
    today.eval.metrics.clip_weights = None  # its default then; now train-clip's {run}/clip (issue 16)
    assert load_config(path, migrate_old=True) == today
    # a resolved config as an older ldm_train wrote it (every section: a run's config.yaml, a Slurm
    # job's config that each requeue reads again) is read as it is, its moved keys in place
    full = {**Config().model_dump(), **old_dump}
    assert load_config(write(tmp_path, yaml.safe_dump(full), "full.yaml")) == today
    with pytest.raises(ConfigError, match="diffusion.loss_weighting: moved to diffusion.loss.weighting"):
        load_config(write(tmp_path, yaml.safe_dump({**full, "slurm": None}), "partial.yaml"))


@pytest.mark.parametrize("override, hint", [
    ("train.learning_rate=1e-4", "train.learning_rate: unknown key; did you mean train.lr? (diffusers/kohya: learning_rate)"),
    ("max_train_steps=10", "did you mean train.steps? (diffusers/kohya: max_train_steps)"),
    ("diffusion.noise_offset=0.1", "did you mean diffusion.loss.offset_noise?"),
    ("distributed.output_dir=x", "did you mean run.dir?"),
    ("train.stepz=5", "train.stepz: unknown key; did you mean train.steps?"),
    ("train.mixed_precision=bf16", "did you mean distributed.mixed_precision?"),  # in another section
    ("eval.clip_modle=x", "did you mean eval.metrics.clip_model?"),  # misspelt and misplaced
    ("trainn.lr=1", "trainn: unknown key; did you mean train"),
])
def test_unknown_key_says_what_was_meant(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert hint in str(info.value)


def test_unknown_key_in_file_says_what_was_meant(tmp_path):
    path = write(tmp_path, "eval:\n  guidance: 3\n")
    with pytest.raises(ConfigError, match=r"eval.guidance: unknown key; did you mean eval.guidance_sweep or eval.guidance_scale\?  \[in "):
        load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.zzzzqqq=1"])
    assert "unknown key  [in command-line override]" in str(info.value)  # nothing close: no guess


def test_every_alias_names_a_key():
    from ldm_train.config import ALIASES, MOVED, dotted_fields

    keys = {key for key, _ in dotted_fields()}
    assert {old: MOVED.get(new, (new,))[0] for old, new in ALIASES.items()
            if MOVED.get(new, (new,))[0] not in keys} == {}


def test_attention_head_dim_is_renamed_channels_per_head(tmp_path):
    """Channels per head here, the head count in diffusers: the old name is refused naming the new
    one, and a resolved config of an older run reads it as channels_per_head."""
    with pytest.raises(ConfigError, match=r"model.attention_head_dim: moved to model.channels_per_head \(channels "
                                          r"per head; diffusers' attention_head_dim is the head count"):
        load_config(None, ["model.attention_head_dim=16"])
    import yaml

    old = Config().model_dump()
    old["model"]["attention_head_dim"] = old["model"].pop("channels_per_head") // 2
    cfg = load_config(write(tmp_path, yaml.safe_dump(old)))
    assert cfg.model.channels_per_head == Config().model.channels_per_head // 2


def test_yaml_boolean_words_mean_the_string_where_a_string_is_expected(tmp_path):
    path = write(tmp_path, "distributed:\n  mixed_precision: no\nslurm:\n  partition: on\n  modules: [no]\n"
                           "  env: {A: yes}\ntrain:\n  tensorboard: no\n")
    cfg = load_config(path)
    assert cfg.distributed.mixed_precision == "no"
    assert cfg.slurm.partition == "on" and cfg.slurm.modules == ["no"] and cfg.slurm.env == {"A": "yes"}
    assert cfg.train.tensorboard is False  # a bool field keeps YAML's bool
    assert load_config(None, ["distributed.mixed_precision=No"]).distributed.mixed_precision == "no"
    assert load_config(path, ["train.tensorboard=on"]).train.tensorboard is True


def test_yaml_boolean_word_refused_with_the_reason_where_the_string_is_not_allowed(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "data:\n  crop: off\n"))
    assert "data.crop: Input should be 'center' or 'random' (got False); YAML reads `off` as false; quote it" in str(info.value)
    with pytest.raises(ConfigError, match=r"mixed_precision: .*YAML reads `off` as false; quote it.*command-line override"):
        load_config(None, ["distributed.mixed_precision=off"])
    with pytest.raises(ConfigError) as info:  # a real false (not a word) gets no YAML note
        load_config(None, ["data.crop=0"])
    assert "YAML reads" not in str(info.value)
