"""LoRA export formats (issue 19): diffusers' and kohya's files load in diffusers with the same U-Net
and text-encoder outputs as our merge, round trips are exact, merge = PEFT's merge_and_unload, and
LoRAs for another architecture, files without LoRA keys and truncated files are refused.

On tiny random SD 1.x / 2.x pipelines (``pretrained.tiny_sd``); the adapters are random (rank 4,
alpha 8: a scale of 2, so that a lost alpha shows) on attention, feed-forward, projections and
resnet convs (3x3, 1x1 shortcuts), and on the CLIP text encoder's attention and MLP.
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_train.export.lora import (LORA_WEIGHT_NAME, METADATA_KEY, TEXT_ROOT, LoraFile, LoraFormatError,
                                   LoraMismatchError, adapter_lora, check_lora, kohya_name, load_lora, merge_lora,
                                   module_from_kohya, module_shapes, peft_adapter, save_diffusers_lora,
                                   save_kohya_lora, save_lora, text_adapter_for)
from pretrained.test_single_file import REAL
from pretrained.tiny_sd import make_tiny_sd, tiny_sd_components

RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def random_adapter(model: torch.nn.Module, targets: list[str], seed: int, rank: int = RANK) -> dict:
    """PEFT's adapter state dict for ``model`` with random A and B (PEFT's init has B = 0)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    adapter = peft_adapter(get_peft_model_state_dict(peft_model))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter.items()}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = make_tiny_sd(tmp_path_factory.mktemp("sd1") / "pipe", "sd1")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    unet = random_adapter(pipe.unet, UNET_TARGETS, seed=1)
    text = random_adapter(pipe.text_encoder, TEXT_TARGETS, seed=2)
    return folder, pipe, adapter_lora(unet, text, rank=RANK, alpha=ALPHA)


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)


def merged_pipe(folder, lora: LoraFile) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.unet.load_state_dict(merge_lora(pipe.unet.state_dict(), lora, "unet"))
    pipe.text_encoder.load_state_dict(merge_lora(pipe.text_encoder.state_dict(), lora, "text"))
    return pipe


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, ctx = unet_inputs()
    ids = pipe.tokenizer(["a red circle", "green"], padding="max_length", return_tensors="pt").input_ids
    return pipe.unet(x, t, ctx).sample, pipe.text_encoder(ids).last_hidden_state


def test_peft_keys_normalised(sd1):
    """get_peft_model_state_dict keeps base_model.model. on a PeftModel, none on an injected model; a
    plain state_dict() keeps the adapter name: all three normalise to the same keys."""
    _, pipe, _ = sd1
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "conv1"])
    wrapped = get_peft_model(copy.deepcopy(pipe.unet), config)
    raw = get_peft_model_state_dict(wrapped)
    assert all(k.startswith("base_model.model.") for k in raw)
    injected = get_peft_model_state_dict(inject_adapter_in_model(config, copy.deepcopy(pipe.unet)))
    named = {k: v for k, v in wrapped.state_dict().items() if ".lora_" in k}
    assert "base_model.model.down_blocks.0.resnets.0.conv1.lora_A.default.weight" in named
    keys = set(peft_adapter(raw))
    assert keys == set(peft_adapter(injected)) == set(injected) == set(peft_adapter(named, "default"))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    with pytest.raises(LoraFormatError, match="lora_magnitude_vector"):
        peft_adapter({"a.lora_magnitude_vector.weight": torch.ones(1)})


def test_diffusers_format_loads_in_diffusers(sd1, tmp_path):
    """pipe.load_lora_weights(folder) = our merge: U-Net and text encoder to 1e-5, DDIM images to 1e-4."""
    folder, _, lora = sd1
    file = save_diffusers_lora(tmp_path / "lora", lora.unet, lora.text, rank=RANK, alpha=ALPHA)
    assert file == tmp_path / "lora" / LORA_WEIGHT_NAME
    with safe_open(str(file), "pt") as f:
        keys, config = set(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (RANK, ALPHA, ALPHA)

    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    base_unet, _ = outputs(theirs)
    theirs.load_lora_weights(tmp_path / "lora")
    ours = merged_pipe(folder, lora)
    (u1, t1), (u2, t2) = outputs(theirs), outputs(ours)
    assert max_diff(u1, base_unet) > 0.1  # the adapter matters
    assert max_diff(u1, u2) < 1e-5 and max_diff(t1, t2) < 1e-5, (max_diff(u1, u2), max_diff(t1, t2))

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images = []
    for pipe in (theirs, ours):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        images.append(pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                           output_type="pt").images)
    assert max_diff(*images) < 1e-4, max_diff(*images)


def test_kohya_layout_loads_in_diffusers(sd1, tmp_path):
    """sd-scripts' names, 0-dim alphas and ss_* metadata; diffusers' kohya converter loads it and gives
    the same U-Net and text-encoder outputs as our merge (1e-5)."""
    folder, _, lora = sd1
    path = save_kohya_lora(tmp_path / "k.safetensors", lora.unet, lora.text, rank=RANK, alpha=ALPHA)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[name + ".lora_down.weight"].shape == (RANK, 32)
    assert tensors[name + ".lora_up.weight"].shape == (32, RANK)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, RANK, 1, 1)
    te = tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    assert te.shape == () and te.dtype == torch.float32 and te.item() == ALPHA
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
    assert len(tensors) == 3 * (len(lora.unet) + len(lora.text)) // 2
    assert {k: meta[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2",
                                 "ss_base_model_version")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0", "ss_v2": "False",
        "ss_base_model_version": "sd_v1"}
    data = path.read_bytes()  # sd-scripts' sshs_model_hash: sha256 of everything after the header
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()

    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.load_lora_weights(path)
    (u1, t1), (u2, t2) = outputs(theirs), outputs(merged_pipe(folder, lora))
    assert max_diff(u1, u2) < 1e-5 and max_diff(t1, t2) < 1e-5, (max_diff(u1, u2), max_diff(t1, t2))


def test_merge_equals_peft_merge_and_unload(sd1):
    """merge_lora = PEFT's merge_and_unload (the adapter set with set_peft_model_state_dict) to 1e-6,
    for the U-Net (linears, 1x1 and 3x3 convs) and the (flat, transformers 5) text encoder; an fp16
    base comes back fp16, merged in fp32."""
    _, pipe, lora = sd1
    for model, part, targets in ((pipe.unet, "unet", UNET_TARGETS), (pipe.text_encoder, "text", TEXT_TARGETS)):
        adapter = lora.unet if part == "unet" else text_adapter_for(model, lora.text)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
        result = set_peft_model_state_dict(peft_model, {"base_model.model." + k: v for k, v in adapter.items()})
        assert not result.unexpected_keys
        theirs = peft_model.merge_and_unload().state_dict()
        ours = merge_lora(model.state_dict(), lora, part)
        assert ours.keys() == theirs.keys()
        assert max(max_diff(ours[k], theirs[k]) for k in ours) < 1e-6
        changed = [k for k in ours if not torch.equal(ours[k], model.state_dict()[k])]
        assert len(changed) == len(adapter) // 2
    half = merge_lora({k: v.half() for k, v in pipe.unet.state_dict().items()}, lora)
    full = merge_lora({k: v.half().float() for k, v in pipe.unet.state_dict().items()}, lora)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], full[k].half()) for k in half)


def kohya_as_sd_scripts_writes(lora: LoraFile, dtype: torch.dtype) -> dict:
    """The state dict of sd-scripts' LoRANetwork.save_weights: lora_name = (prefix + "." + module)
    with dots replaced, alpha = torch.tensor(alpha) registered as a buffer, all cast to the save dtype."""
    state = {}
    for prefix, adapter in (("lora_unet", lora.unet), ("lora_te", lora.text)):
        for key in adapter:
            module, which = key.rsplit(".", 2)[0], key.split(".")[-2]
            name = (prefix + "." + module).replace(".", "_")
            state[f"{name}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = adapter[key].to(dtype)
            state[f"{name}.alpha"] = torch.tensor(ALPHA).to(dtype)
    return state


def raw(path) -> dict:
    """{key: (dtype, shape, bytes)} of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {k: (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
                for k in f.keys() for t in [f.get_tensor(k)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kohya_round_trip_bit_exact(sd1, tmp_path, dtype):
    """A file laid out as sd-scripts writes it -> load_lora -> save_lora: the same keys and bytes;
    and save_kohya_lora from the in-memory adapter writes exactly that file's tensors."""
    _, _, lora = sd1
    theirs = tmp_path / "theirs.safetensors"
    save_file(kohya_as_sd_scripts_writes(lora, dtype), str(theirs), metadata={"ss_network_dim": "4", "ss_seed": "7"})
    loaded = load_lora(theirs)
    assert (loaded.format, loaded.rank, loaded.alpha) == ("kohya", RANK, ALPHA)
    assert loaded.unet.keys() == lora.unet.keys() and loaded.text.keys() == lora.text.keys()
    again = save_lora(tmp_path / "again.safetensors", loaded)
    assert raw(again) == raw(theirs)
    assert load_lora(again).metadata["ss_seed"] == "7"  # the file's own metadata is kept
    cast = {k: v.to(dtype) for k, v in lora.unet.items()}, {k: v.to(dtype) for k, v in lora.text.items()}
    ours = save_kohya_lora(tmp_path / "ours.safetensors", *cast, rank=RANK, alpha=ALPHA)
    assert raw(ours) == raw(theirs)


def test_diffusers_round_trip(sd1, tmp_path):
    _, _, lora = sd1
    first = save_diffusers_lora(tmp_path / "a", lora.unet, lora.text, rank=RANK, alpha=ALPHA)
    loaded = load_lora(tmp_path / "a")
    assert (loaded.format, loaded.rank, loaded.alpha, loaded.path) == ("diffusers", RANK, ALPHA, tmp_path / "a")
    assert all(torch.equal(loaded.unet[k], v) for k, v in lora.unet.items()) and loaded.unet.keys() == lora.unet.keys()
    assert all(torch.equal(loaded.text[k], v) for k, v in lora.text.items()) and loaded.text.keys() == lora.text.keys()
    second = save_lora(tmp_path / "b", loaded)
    assert raw(second) == raw(first)
    with safe_open(str(first), "pt") as f, safe_open(str(second), "pt") as g:
        assert f.metadata() == g.metadata()
    assert load_lora(first).unet.keys() == loaded.unet.keys()  # the file itself reads as the folder


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_kohya_names_invert_on_real_sd(family):
    """module_from_kohya(kohya_name(m)) == m for every Linear/Conv2d of the real SD 1.5 / 2.1 U-Net and
    text encoder (meta tensors), so that no "_" in a diffusers or CLIP name is mistaken for a dot."""
    real = REAL[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, **real["unet"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **real["text"]))
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    names = [("unet", n) for n, m in unet.named_modules() if isinstance(m, layers)]
    names += [("text", TEXT_ROOT + n.removeprefix(TEXT_ROOT)) for n, m in text.named_modules() if isinstance(m, layers)]
    assert len(names) > 300
    for part, name in names:
        assert module_from_kohya(kohya_name(part, name)) == (part, name)


def refused(error, call, *needles) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def test_another_architecture_refused(sd1, tmp_path):
    """An SD 1.x LoRA against an SD 2.x U-Net (linear proj_in, other widths): the first mismatched
    key, as the file spells it; a module the U-Net lacks; merge_lora refuses the same way."""
    _, pipe, lora = sd1
    sd2 = module_shapes(tiny_sd_components("sd2")["unet"].state_dict())
    kohya = load_lora(save_kohya_lora(tmp_path / "k.safetensors", lora.unet, rank=RANK, alpha=ALPHA))
    refused(LoraMismatchError, lambda: check_lora(sd2, kohya), str(tmp_path / "k.safetensors"),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight has shape (4, 32, 1, 1)", "needs (4, 64)")
    save_diffusers_lora(tmp_path / "d", lora.unet, rank=RANK, alpha=ALPHA)
    refused(LoraMismatchError, lambda: check_lora(sd2, load_lora(tmp_path / "d")),
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight has shape")
    extra = dict(lora.unet, **{"down_blocks.5.resnets.0.conv1.lora_A.weight": torch.zeros(RANK, 8, 3, 3),
                               "down_blocks.5.resnets.0.conv1.lora_B.weight": torch.zeros(8, RANK, 1, 1)})
    alien = adapter_lora(extra, rank=RANK, alpha=ALPHA)
    refused(LoraMismatchError, lambda: merge_lora(pipe.unet.state_dict(), alien),
            "down_blocks.5.resnets.0.conv1.lora_A.weight names no module of this U-Net")
    both = load_lora(save_kohya_lora(tmp_path / "both.safetensors", lora.unet, lora.text, rank=RANK, alpha=ALPHA))
    unet = module_shapes(pipe.unet.state_dict())
    check_lora(unet, both, module_shapes(pipe.text_encoder.state_dict()))  # fits (flat transformers 5 names)
    wide = {k: (2 * v[0], *v[1:]) for k, v in module_shapes(pipe.text_encoder.state_dict()).items()}
    refused(LoraMismatchError, lambda: check_lora(unet, both, wide),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight has shape (256, 4)", "text encoder")


def test_bad_files_refused(sd1, tmp_path):
    """No LoRA keys, truncated, pickles, an empty folder, SDXL, LyCORIS, half pairs, several ranks,
    rank <= 0: one line naming the file (and key)."""
    _, pipe, lora = sd1
    weights = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, str(weights))
    refused(LoraFormatError, lambda: load_lora(weights), str(weights), "no LoRA keys", "conv_in")
    good = save_kohya_lora(tmp_path / "k.safetensors", lora.unet, rank=RANK, alpha=ALPHA)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    refused(LoraFormatError, lambda: load_lora(cut), str(cut), "truncated or corrupt")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x02")
    refused(LoraFormatError, lambda: load_lora(pickle), str(pickle), "only .safetensors")
    (tmp_path / "empty").mkdir()
    refused(LoraFormatError, lambda: load_lora(tmp_path / "empty"), LORA_WEIGHT_NAME)
    down = torch.zeros(RANK, 64)
    cases = {
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down}, "SDXL"),
        "loha": ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": down}, "'lora_unet_mid_block_attentions_0_proj_in.hada_w1_a'"),
        "half": ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down}, "lacks its lora_down or lora_up"),
        "ranks": ({"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, RANK),
                   "lora_unet_b_to_q.lora_down.weight": down[:2].clone(), "lora_unet_b_to_q.lora_up.weight": torch.zeros(8, 2)},
                  "lora_unet_b_to_q has rank 2"),
        "old-diffusers": ({"unet.mid_block.attentions.0.processor.to_q_lora.down.weight": down}, "not a diffusers PEFT"),
    }
    for name, (tensors, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        refused(LoraFormatError, lambda: load_lora(path), str(path), needle)
    refused(LoraFormatError, lambda: save_kohya_lora(tmp_path / "r.safetensors", lora.unet, rank=0, alpha=1), "rank")
    refused(LoraFormatError, lambda: save_diffusers_lora(tmp_path / "r", lora.unet, rank=2, alpha=1), "rank-2 pair")
    refused(LoraFormatError, lambda: save_kohya_lora(tmp_path / "r.pt", lora.unet, rank=RANK, alpha=1), ".safetensors")


def lora_pipeline(folder):
    """Our pipeline for the tiny SD folder with a random PEFT adapter injected into its U-Net (ours),
    as eval.pipeline builds a LoRA run's (train.lora: PEFT's inject_adapter_in_model, adapter "default")."""
    from ldm_train.eval.pipeline import load_pipeline

    pipe = load_pipeline(folder, torch.device("cpu"))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False)
    inject_adapter_in_model(config, pipe.unet, adapter_name="default")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


def test_export_stage_writes_lora_run(sd1, tmp_path, monkeypatch):
    """export of a LoRA run: {out}/lora/ holds both formats; without --merge the export is the base and
    diffusers' pipeline + load_lora_weights(lora/) = our PEFT-adapted U-Net (1e-5); with --merge the
    export is the merged U-Net (1e-5) and --single-file holds exactly its weights; a run without an
    adapter refuses --merge."""
    import ldm_train.eval.pipeline as pipeline_module
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    from ldm_train import stages
    from ldm_train.config import Config
    from ldm_train.errors import UserError

    folder = sd1[0]
    pipe = lora_pipeline(folder)
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda *a, **k: pipe)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        want = pipe.unet(x, t, ctx)
    for merge in (False, True):
        out, single = tmp_path / f"export-{merge}", tmp_path / "sd.safetensors"
        summary = stages.export_stage(Config(), out, False, folder, single_file=single if merge else None, merge=merge)
        assert summary["lora"] == [str(out / "lora" / LORA_WEIGHT_NAME), str(out / "lora" / "kohya_lora.safetensors")]
        exported = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
        if not merge:
            base = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
            assert all(torch.equal(v, base[k]) for k, v in exported.unet.state_dict().items())
            exported.load_lora_weights(out / "lora")
        with torch.no_grad():
            diff = max_diff(exported.unet(x, t, ctx).sample, want)
        assert diff < 1e-5, (merge, diff)
        assert load_lora(out / "lora" / "kohya_lora.safetensors").rank == RANK
    theirs = convert_ldm_unet_checkpoint(load_file(str(single)), dict(exported.unet.config))
    assert all(torch.equal(theirs[k], v) for k, v in exported.unet.state_dict().items())
    plain = pipeline_module.Pipeline(**{**vars(pipe), "unet": exported.unet})
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda *a, **k: plain)
    refused(UserError, lambda: stages.export_stage(Config(), tmp_path / "e", False, folder, merge=True), "not a LoRA run")
