"""``ldm-train config show|keys`` and the README's configuration table, both from the schema: every
key has a one-line doc (its ``Field(description=...)``), and the README lists every section and key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ldm_train.cli import main
from ldm_train.config import Config, dotted_fields, load_config
from ldm_train.config_doc import iter_keys, sections

REPO = Path(__file__).resolve().parents[1]


def test_every_key_and_section_has_a_one_line_doc():
    undocumented = [key for key, field in dotted_fields() if not (field.description or "").strip()]
    assert undocumented == []
    assert [name for name, doc in sections().items() if not doc] == []
    assert all("\n" not in (field.description or "") for _, field in dotted_fields())


def test_keys_lists_nested_sections_and_sampler_settings(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    for key in ("diffusion.loss.weighting", "eval.metrics.clip_model", "data.emoji.font", "eval.samplers.ddim.eta",
                "model.channels_per_head", "slurm.template"):
        assert re.search(rf"^{re.escape(key)}\s", out, re.M), key
    assert "eval.samplers " not in out  # the dict itself is replaced by its samplers' settings
    keys = {k.name: k for k in iter_keys()}
    assert keys["diffusion.loss.weighting"].type == '"uniform" | "min_snr" | "edm"'
    assert keys["diffusion.loss.weighting"].default == "uniform"
    assert keys["train.lr"].type == "float (> 0)" and keys["train.lr"].default == Config().train.lr
    assert keys["eval.samplers.ddim.eta"].default == 0.0


def test_keys_of_one_section(capsys):
    assert main(["config", "keys", "diffusion"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert names and all(n.startswith("diffusion.") for n in names)
    assert "diffusion.loss.min_snr_gamma" in names and "diffusion.sde.t_eps" in names
    assert main(["config", "keys", "difusion"]) == 2
    assert "no section or key 'difusion'" in capsys.readouterr().err


def test_show_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\ndistributed:\n  mixed_precision: no\n")
    assert main(["config", "show", "--config", str(path), "train.steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(path, ["train.steps=7"])
    assert shown == cfg.model_dump()
    assert shown["train"]["lr"] == 1e-4 and shown["train"]["steps"] == 7
    assert shown["distributed"]["mixed_precision"] == "no"


def test_show_refuses_what_a_stage_would_refuse(capsys):
    assert main(["config", "show", "diffusion.prediction_type=epsilon", "diffusion.rescale_betas_zero_snr=true"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "inconsistent configuration" in captured.err


def test_show_refuses_an_unknown_key_with_a_suggestion(capsys):
    assert main(["config", "show", "train.learning_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key; did you mean train.lr? (diffusers/kohya: learning_rate)" in err


# --- the README's table ----------------------------------------------------------------------

def readme_table() -> dict[str, list[str]]:
    """{section: the keys its README row lists} (the backticked names of the last column, values
    in parentheses left out; ``a.{b,c}`` is a.b and a.c; ``a.*`` is the whole nested section a)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \|[^|]*\| (.*) \|$", line)
        if m:
            keys_col = re.sub(r"\([^()]*\)", "", m.group(2))
            keys = []
            for token in re.findall(r"`([^`]+)`", keys_col):
                if g := re.fullmatch(r"([\w.]+)\.\{([^}]*)\}", token):
                    keys += [f"{g.group(1)}.{k.strip()}" for k in g.group(2).split(",")]
                else:
                    keys.append(token)
            rows[m.group(1)] = keys
    return rows


def _section_keys(section: str) -> list[str]:
    return [key[len(section) + 1:] for key, _ in dotted_fields() if key.startswith(section + ".")]


def test_readme_table_has_a_row_per_section():
    assert list(readme_table()) == list(Config.model_fields)


@pytest.mark.parametrize("section", list(Config.model_fields))
def test_readme_row_lists_exactly_the_sections_keys(section):
    listed = readme_table()[section]
    keys = _section_keys(section)
    nested = {k.split(".")[0] for k in keys if "." in k}
    unknown = []
    for token in listed:
        if token.endswith(".*"):
            prefix = token[:-2].replace(".NAME", "")  # samplers.NAME.*: each sampler's settings
            ok = prefix in nested or prefix in keys
        else:
            ok = token in keys
        if not ok:
            unknown.append(token)
    assert unknown == [], f"README lists keys that {section} does not have"
    star = {t[:-2].split(".")[0] for t in listed if t.endswith(".*")}
    missing = [k for k in keys if k not in listed and k.split(".")[0] not in star]
    assert missing == [], f"README's {section} row lacks these keys"
