import pytest

from ldm_train.utils.runs import last_segment


def test_last_segment_keeps_only_the_latest_run_of_an_append_only_log():
    first = [(0, 1.0), (49, 0.5), (99, 0.4)]
    second = [(0, 0.9), (49, 0.6)]
    assert last_segment(first + second) == second
    assert last_segment(first) == first
    assert last_segment([]) == []


def test_record_config_treats_keys_missing_from_an_older_file_as_their_defaults(tmp_path):
    """A run started by an older version (its config.yaml lacks a newer key) may resume when the
    key has its default; a non-default value is still a different run."""
    import yaml

    from ldm_train.config import load_config
    from ldm_train.utils.runs import OutputExistsError, record_config

    cfg = load_config(None, [f"run.dir={tmp_path}"])
    path = record_config(cfg, False)
    old = yaml.safe_load(path.read_text())
    del old["train"]["data_source"]
    path.write_text(yaml.safe_dump(old))
    record_config(cfg, False, write=False)
    with pytest.raises(OutputExistsError, match="train.data_source"):
        record_config(load_config(None, [f"run.dir={tmp_path}", "train.data_source=stream"]), False, write=False)


def test_record_config_accepts_a_run_written_before_keys_moved(tmp_path):
    """A run folder whose config.yaml has the flat diffusion/eval keys of before (diffusion.loss_weighting,
    eval.eta, eval.inception_weights, ...) is the same run as today's config with the keys nested."""
    import yaml

    from ldm_train.config import MOVED, load_config
    from ldm_train.utils.runs import OutputExistsError, record_config

    cfg = load_config(None, [f"run.dir={tmp_path}", "diffusion.loss.weighting=min_snr", "eval.samplers.ddim.eta=0.5"])
    path = record_config(cfg, False)
    old = yaml.safe_load(path.read_text())
    d, e = old["diffusion"], old["eval"]
    d.update(loss_weighting=d.pop("loss")["weighting"], min_snr_gamma=5.0, learned_variance=False, t_eps=1e-5)
    for section in ("iddpm", "sde", "ncsn", "score_matching"):
        del d[section]
    e.update(eta=0.5, spacing="leading", s_churn=0.0, **e.pop("metrics"))
    del e["samplers"]
    assert any(f"diffusion.{k}" in MOVED for k in d) and any(f"eval.{k}" in MOVED for k in e)
    path.write_text(yaml.safe_dump(old))
    record_config(cfg, False, write=False)  # the same run: may resume
    assert load_config(path).diffusion.loss.weighting == "min_snr"  # resolved file: read with keys moved
    with pytest.raises(OutputExistsError, match="diffusion.loss"):
        record_config(load_config(None, [f"run.dir={tmp_path}", "eval.samplers.ddim.eta=0.5"]), False, write=False)
