"""Checkpoints laid out as they are published, in tiny: DMD2's bare UNet state dicts, PickScore
without its tokenizer, a hub reference with multi-GB extras beside the pipeline (here a few MB of
junk), pinned hub revisions. They load through the code users call; the extras are never fetched
nor exported. No network: the hub cache is built by hand and HF_HUB_OFFLINE is on (conftest)."""

import copy
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from distar import storage
from distar.config import ConfigError, load_config
from distar.errors import UserError
from distar.models import sources, tiny
from distar.models.checkpoints import initial_unet
from distar.models.diffusion import OneStepGenerator, export_generator, load_parts
from distar.models.sampling import Sampler
from distar.rewards import REWARD_NAMES, MissingProcessorError
from distar.run import build

COMMIT, COMMIT_V2 = "a" * 40, "b" * 40
DECOYS = ["v1-5-pruned.ckpt", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
          "safety_checker/config.json", "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json", "README.md"]
PROMPTS = ["a small red circle on the left", "a large blue square on the right"]


files_under = lambda folder: {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}  # noqa: E731


@pytest.fixture(scope="module")
def dmd2_unet(tmp_path_factory) -> dict[str, torch.Tensor]:
    """A tiny sd15 UNet of other weights than the reference's, in fp16 as DMD2 publishes it."""
    folder = tiny.build_sd15_pipeline(tmp_path_factory.mktemp("dmd2") / "pipe", seed=1)
    return {k: v.half() for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}


@pytest.fixture(scope="module")
def published_sd15(tmp_path_factory) -> Path:
    """A tiny sd15 pipeline as published: with a root checkpoint, variants, a safety checker, a README."""
    folder = tiny.build_sd15_pipeline(tmp_path_factory.mktemp("published") / "sd15")
    (folder / "v1-5-pruned.ckpt").write_bytes(torch.randint(0, 255, (4 << 20,), dtype=torch.uint8).numpy().tobytes())
    for decoy in DECOYS[1:]:  # sizes do not matter to these: their names do
        (folder / decoy).parent.mkdir(exist_ok=True)
        (folder / decoy).write_bytes(b"not a file the one-step pipeline loads")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, published_sd15, dmd2_unet):
    """An offline hub cache: distar-test/sd15 at main (COMMIT) and branch v2 (COMMIT_V2, other UNet
    weights); distar-test/dmd2 holding a bare state dict at main and v2."""
    cache = tmp_path / "hub"
    sd15, dmd2 = cache / "models--distar-test--sd15", cache / "models--distar-test--dmd2"
    for commit in (COMMIT, COMMIT_V2):
        shutil.copytree(published_sd15, sd15 / "snapshots" / commit)
    save_file({k: v.float().contiguous() for k, v in dmd2_unet.items()}, sd15 / "snapshots" / COMMIT_V2 / "unet" / "diffusion_pytorch_model.safetensors")
    for commit, scale in ((COMMIT, 1.0), (COMMIT_V2, 2.0)):
        (dmd2 / "snapshots" / commit).mkdir(parents=True)
        torch.save({k: v * scale for k, v in dmd2_unet.items()}, dmd2 / "snapshots" / commit / "dmd2_unet_fp16.bin")
    for repo, (ref, commit) in ((r, c) for r in (sd15, dmd2) for c in (("main", COMMIT), ("v2", COMMIT_V2))):
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(int(value) if value is True else value))
        monkeypatch.setattr(huggingface_hub.constants, name, value)  # huggingface_hub reads them once, at import
    return cache


def sd15_config(reference: Path, *overrides: str):
    return load_config(None, [f"model.reference={reference}", "model.family=sd15", *overrides])


# (a) DMD2's bare state dicts start the generator

@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_a_bare_state_dict_file_starts_the_generator(tiny_pipeline, dmd2_unet, tmp_path, suffix):
    path = tmp_path / f"dmd2_sd15_1step_unet_fp16{suffix}"
    torch.save(dmd2_unet, path) if suffix == ".bin" else save_file(dmd2_unet, path)
    cfg = sd15_config(tiny_pipeline, f"model.generator_init={path}")
    build.check_inputs(cfg)
    parts = build.reference_parts(cfg)
    reference = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    generator, fake = build.trainable_networks(cfg, parts)
    assert generator.unet is not parts.unet and generator.unet.config == parts.unet.config
    loaded = generator.unet.state_dict()
    assert loaded.keys() == dmd2_unet.keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in dmd2_unet.items())
    assert sum(not torch.equal(loaded[k], reference[k]) for k in reference) > len(reference) // 2
    assert all(torch.equal(fake.unet.state_dict()[k], v) for k, v in reference.items())  # the fake score stays the reference


def test_the_new_unet_keeps_the_reference_dtype_and_leaves_it_untouched(tiny_pipeline, dmd2_unet, tmp_path):
    save_file(dmd2_unet, tmp_path / "unet.safetensors")
    reference = load_parts(tiny_pipeline, 1000).unet.to(torch.bfloat16)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    unet = initial_unet(tmp_path / "unet.safetensors", reference, "model.generator_init")
    assert unet is not reference and {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert all(torch.equal(unet.state_dict()[k], v.to(torch.bfloat16)) for k, v in dmd2_unet.items())
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in before.items())
    for folder in (tiny_pipeline, tiny_pipeline / "unet"):  # a pipeline folder, a UNet folder: the reference's own weights
        loaded = initial_unet(folder, reference, "model.generator_init").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in before.items())


# (b) a state dict that does not fit says where, in one line (exit status 2)

def fit_error(state: dict, path: Path, reference: Path, parts) -> str:
    torch.save(state, path) if path.suffix == ".bin" else save_file(state, path)
    with pytest.raises(UserError) as raised:  # through the code a run calls
        build.trainable_networks(sd15_config(reference, f"model.generator_init={path}"), parts)
    assert raised.value.status == 2 and "\n" not in raised.value.message
    assert raised.value.message.startswith(f"model.generator_init: {path} does not fit the reference UNet")
    return raised.value.message


def test_a_renamed_key_and_a_wrong_shape_are_named(tiny_pipeline, tmp_path):
    parts = load_parts(tiny_pipeline, 1000)
    state = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    renamed = dict(state, **{"conv_in.weights": state["conv_in.weight"]})
    del renamed["conv_in.weight"]
    message = fit_error(renamed, tmp_path / "pytorch_model.bin", tiny_pipeline, parts)
    assert message.endswith(": 1 missing keys (conv_in.weight), 1 unexpected keys (conv_in.weights)")
    message = fit_error(dict(state, **{"conv_in.weight": torch.zeros(16, 4, 3, 3)}), tmp_path / "reshaped.safetensors", tiny_pipeline, parts)
    assert message.endswith(": 1 shape mismatches (conv_in.weight: expected (32, 4, 3, 3), got (16, 4, 3, 3))")
    half = dict(list(state.items())[: len(state) // 2])
    message = fit_error(half, tmp_path / "half.safetensors", tiny_pipeline, parts)
    assert message.endswith(f": {len(state) - len(half)} missing keys ({'; '.join(list(state)[len(half):len(half) + 3])}; ...)")


class Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses to rebuild it."""


def test_files_that_are_no_state_dict_are_refused_without_unpickling(tiny_pipeline, tmp_path):
    reference = load_parts(tiny_pipeline, 1000).unet
    torch.save({"conv_in.weight": Pickled()}, tmp_path / "code.bin")
    with pytest.raises(UserError, match="model.generator_init: .*code.bin is not a weights-only state dict"):
        initial_unet(tmp_path / "code.bin", reference, "model.generator_init")
    (tmp_path / "unet.ckpt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"model\.generator_init: .*unet\.ckpt' is not a folder or state-dict file \(.safetensors, .bin, .pt\)"):
        build.check_inputs(sd15_config(tiny_pipeline, f"model.generator_init={tmp_path / 'unet.ckpt'}"))
    with pytest.raises(ConfigError, match="model.reference: .*unet.bin' is not a folder$"):  # a file only where the field takes one
        torch.save({}, tmp_path / "unet.bin")
        build.check_inputs(sd15_config(tmp_path / "unet.bin"))


# (c) PickScore's weights without a tokenizer, its processor from another repository
TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
MEAN, STD = [0.3, 0.5, 0.7], [0.2, 0.3, 0.4]  # not CLIP's: scores tell whether this config was read


@pytest.fixture(scope="module")
def pickscore_split(tmp_path_factory):
    """(complete folder, weights-only folder, processor folder) of one tiny PickScore."""
    root = tmp_path_factory.mktemp("pickscore")
    complete = tiny.build_clip(root / "complete")
    config = json.loads((complete / "preprocessor_config.json").read_text())
    (complete / "preprocessor_config.json").write_text(json.dumps(dict(config, image_mean=MEAN, image_std=STD)))
    weights, processor = root / "PickScore_v1", root / "CLIP-ViT-H-14"
    shutil.copytree(complete, weights, ignore=shutil.ignore_patterns(*TOKENIZER, "preprocessor_config.json"))
    shutil.copytree(complete, processor, ignore=lambda _, names: [n for n in names if n not in [*TOKENIZER, "preprocessor_config.json"]])
    return complete, weights, processor


def pickscores(cfg) -> torch.Tensor:
    model = build.reward_models(cfg)["pickscore"]
    images = torch.rand(3, 3, tiny.RESOLUTION, tiny.RESOLUTION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(images, [*PROMPTS, "a green triangle"])


def test_pickscore_takes_its_processor_from_another_folder(pickscore_split, tmp_path):
    complete, weights, processor = pickscore_split
    assert not (weights / "tokenizer_config.json").exists() and (weights / "model.safetensors").is_file()
    split = load_config(None, [f"rewards.0.source={weights}", f"rewards.0.processor={processor}"])
    build.check_inputs(split)
    expected = pickscores(load_config(None, [f"rewards.0.source={complete}"]))
    torch.testing.assert_close(pickscores(split), expected, rtol=0, atol=0)
    # the processor's preprocessing config is read, not CLIP's defaults
    shutil.copytree(processor, tmp_path / "tokenizer_only", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    defaults = pickscores(load_config(None, [f"rewards.0.source={weights}", f"rewards.0.processor={tmp_path / 'tokenizer_only'}"]))
    assert (defaults - expected).abs().max() > 1e-3


def test_pickscore_without_a_tokenizer_says_to_set_the_processor(pickscore_split):
    _, weights, _ = pickscore_split
    with pytest.raises(MissingProcessorError) as raised:
        pickscores(load_config(None, [f"rewards.0.source={weights}"]))
    message = raised.value.message
    assert "\n" not in message and message.startswith(f"{weights} has no tokenizer") and "set rewards.0.processor to" in message
    with pytest.raises(ConfigError, match="rewards.0.processor: '/no/such/processor' is not a folder"):
        build.check_inputs(load_config(None, [f"rewards.0.source={weights}", "rewards.0.processor=/no/such/processor"]))
    with pytest.raises(ConfigError, match="rewards.1.processor: aesthetic reads no tokenizer"):
        build.check_inputs(load_config(None, ["rewards.1.name=aesthetic", "rewards.1.source=tiny-random", "rewards.1.processor=tiny-random"]))


# (d) a hub-style reference with decoys: neither fetched nor exported
PIPELINE_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                  "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
                  "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"}


def test_the_patterns_the_hub_applies_leave_out_the_decoys(published_sd15):
    names = files_under(published_sd15)
    assert set(DECOYS) <= names and PIPELINE_FILES <= names
    assert set(filter_repo_objects(names, allow_patterns=sources.needed("sd15"))) == PIPELINE_FILES
    assert set(sources.select(names, "sd15")) == PIPELINE_FILES
    # bin weights only where a part has no safetensors, and never a variant
    only_bin = {n.replace("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors") for n in names}
    chosen = set(sources.select(only_bin, "sd15"))
    assert "vae/diffusion_pytorch_model.bin" in chosen and not {n for n in chosen if ".fp16." in n or n.endswith(".ckpt")}
    assert set(sources.select(names, "unet")) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert all(sources.needed(kind) for kind in (*REWARD_NAMES, "toy", "sd15", "sdxl", "unet", "processor"))  # every kind fetches


def test_a_hub_reference_is_fetched_for_the_pipeline_files_only(hub, monkeypatch):
    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: asked.append(kw["allow_patterns"]) or real(*a, **kw))
    folder = sources.resolve("distar-test/sd15", "sd15", hub, "model.reference")
    assert folder == hub / "models--distar-test--sd15" / "snapshots" / COMMIT
    assert len(asked) == 1 and set(filter_repo_objects(files_under(folder), allow_patterns=asked[0])) == PIPELINE_FILES
    images = Sampler(folder, steps=2).generate(PROMPTS[:1], [0])  # its index names parts not fetched: they load as None
    assert images.shape == (1, 3, tiny.RESOLUTION, tiny.RESOLUTION) and torch.isfinite(images).all()


def test_the_export_holds_what_the_one_step_pipeline_loads(hub, tmp_path):
    from diffusers import StableDiffusionPipeline

    reference = sources.resolve("distar-test/sd15", "sd15", hub, "model.reference")
    parts = load_parts(reference, 1000, family="sd15")
    out = export_generator(OneStepGenerator(copy.deepcopy(parts.unet), parts.schedule, 399), parts.folder, tmp_path / "generator")
    assert files_under(out) == PIPELINE_FILES | {"distar.json"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == index["feature_extractor"] == [None, None] and index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (reference / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not (out / "vae" / "diffusion_pytorch_model.safetensors").is_symlink()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None and pipe.scheduler.__class__.__name__ == "LCMScheduler"
    images = Sampler(out).generate(PROMPTS, [0, 1])
    assert images.shape == (2, 3, tiny.RESOLUTION, tiny.RESOLUTION) and torch.isfinite(images).all() and images.std() > 0


# (e) hub revisions, and hub files where the field takes a file

def test_hub_revisions_resolve_from_an_offline_cache(hub):
    snapshots = hub / "models--distar-test--sd15" / "snapshots"
    assert sources.resolve("distar-test/sd15", "sd15", hub, "model.reference") == snapshots / COMMIT
    assert sources.resolve("distar-test/sd15@v2", "sd15", hub, "model.reference") == snapshots / COMMIT_V2
    assert sources.resolve(f"distar-test/sd15@{COMMIT}", "sd15", hub, "model.reference") == snapshots / COMMIT
    for bad in ("distar-test/sd15@no-such-branch", "distar-test/sd15@" + "c" * 40, "distar-test/no-such-repo"):
        with pytest.raises(sources.SourceError) as raised:
            sources.resolve(bad, "sd15", hub, "model.reference")
        assert raised.value.message.startswith(f"model.reference: could not fetch hub model {bad!r}: ") and "\n" not in raised.value.message
        assert raised.value.status == 2


def test_a_hub_state_dict_file_at_a_revision_starts_the_generator(hub, tiny_pipeline, dmd2_unet):
    snapshots = hub / "models--distar-test--dmd2" / "snapshots"
    assert sources.resolve("distar-test/dmd2/dmd2_unet_fp16.bin", "sd15", hub, "f", files="unet") == snapshots / COMMIT / "dmd2_unet_fp16.bin"
    cfg = sd15_config(tiny_pipeline, "model.generator_init=distar-test/dmd2/dmd2_unet_fp16.bin@v2")
    build.check_inputs(cfg)
    generator, _ = build.trainable_networks(cfg, build.reference_parts(cfg))
    assert all(torch.equal(generator.unet.state_dict()[k], 2 * v.float()) for k, v in dmd2_unet.items())
    with pytest.raises(sources.SourceError, match="model.generator_init: could not fetch hub model 'distar-test/dmd2/other.bin'"):
        build.trainable_networks(sd15_config(tiny_pipeline, "model.generator_init=distar-test/dmd2/other.bin"), build.reference_parts(cfg))
    with pytest.raises(sources.SourceError, match="model.reference: 'distar-test/sd15/unet/x.bin' is not a folder; it takes a hub repository id"):
        sources.resolve("distar-test/sd15/unet/x.bin", "sd15", hub, "model.reference")


@pytest.mark.slow  # a moto S3 server
def test_an_s3_copy_never_downloads_the_decoys(published_sd15, dmd2_unet, tmp_path, servers, monkeypatch):
    from test_storage import BUCKET, S3Server

    s3, got = S3Server(tmp_path, servers), []
    try:
        s3.client().create_bucket(Bucket=BUCKET)
        s3.upload_folder(published_sd15, "models/sd15")
        torch.save(dmd2_unet, tmp_path / "unet.bin")
        s3.client().upload_file(str(tmp_path / "unet.bin"), BUCKET, "models/dmd2/unet.bin")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        spied = storage.client

        def client():  # records every object downloaded
            c = spied()
            c.download_file = lambda bucket, key, path, _real=c.download_file: got.append(key) or _real(bucket, key, path)
            return c

        monkeypatch.setattr(storage, "client", client)
        folder = sources.resolve(f"s3://{BUCKET}/models/sd15", "sd15", tmp_path / "cache", "model.reference")
        assert files_under(folder) == PIPELINE_FILES and sorted(got) == sorted(f"models/sd15/{n}" for n in PIPELINE_FILES)
        fetched, published = (load_parts(f, 1000, family="sd15").unet.state_dict() for f in (folder, published_sd15))
        assert all(torch.equal(fetched[k], v) for k, v in published.items())
        unet = sources.resolve(f"s3://{BUCKET}/models/sd15/", "sd15", tmp_path / "cache", "model.generator_init", files="unet")
        assert files_under(unet) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
        state = sources.resolve(f"s3://{BUCKET}/models/dmd2/unet.bin", "sd15", tmp_path / "cache", "model.generator_init", files="unet")
        assert state.read_bytes() == (tmp_path / "unet.bin").read_bytes() and not [k for k in got if k.endswith((".ckpt", ".fp16.safetensors"))]
        with pytest.raises(storage.StorageError, match="none of the 1 objects under it is a file this model loads"):
            sources.resolve(f"s3://{BUCKET}/models/dmd2", "sd15", tmp_path / "cache", "model.reference")
    finally:
        s3.stop()
