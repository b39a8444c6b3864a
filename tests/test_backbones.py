"""Backbone registry: real efficientnet_lite0 weights, local weight files, pooling, pixels, errors."""

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_sample_images

from pinterest_cls.core.errors import UserError
from pinterest_cls.embed import weights as backbones
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.registry import REGISTRY, timm_model_of

from .helpers import make_cfg


def bcfg(name, **kw):
    """The backbone config group exactly as Hydra composes it for backbone=<name>."""
    overrides = [f"backbone={name}"] + [f"backbone.{k}={'null' if v is None else v}" for k, v in kw.items()]
    return make_cfg("extract", overrides).backbone


def test_every_registered_backbone_has_a_config_and_a_timm_model():
    for name, spec in REGISTRY.items():
        cfg = bcfg(name)
        assert cfg.name == name and cfg.model is None and timm_model_of(cfg) == spec.model  # one source: REGISTRY
        assert timm.is_model(spec.model) and spec.model in timm.list_pretrained(spec.model.split(".")[0] + "*")
    assert timm_model_of(bcfg("xception", model="legacy_xception.tf_in1k")) == "legacy_xception.tf_in1k"
    sizes = {n: REGISTRY[n].image_size for n in REGISTRY if n.startswith("efficientnet_v2")}
    assert sizes == {"efficientnet_v2_b0": 224, "efficientnet_v2_b1": 240, "efficientnet_v2_b2": 260,
                     "efficientnet_v2_b3": 300, "efficientnet_v2_s": 384, "efficientnet_v2_m": 480,
                     "efficientnet_v2_l": 480}
    assert REGISTRY["xception"].image_size == 299


def test_efficientnet_lite0_real_weights_classify_sample_photos():
    """The package's EfficientNet-PyTorch weights, translated by rule, give ImageNet's right answers."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()  # with its 1000-class head
    backbones._load_translated(model, backbones._package_weights("package:efficientnet_lite0"))
    feat = build_backbone(bcfg("efficientnet_lite0"))
    assert feat.info["weights"].startswith("package:efficientnet_lite0") and len(feat.info["weights_sha256"]) == 64
    photos = load_sample_images()
    expected = {"china.jpg": 698, "flower.jpg": 985}  # palace, daisy
    for path, arr in zip(photos.filenames, photos.images):
        x = feat.transform(Image.fromarray(arr)).unsqueeze(0)
        assert x.dtype == torch.uint8 and x.shape == (1, 3, 224, 224)
        with torch.inference_mode():
            features = feat.model(x)
            logits = model.get_classifier()(features)
            direct = model(feat.model.normalize(x))
        assert int(logits.argmax()) == expected[path.rsplit("/", 1)[-1]]
        torch.testing.assert_close(logits, direct, rtol=1e-4, atol=1e-4)
    assert features.shape == (1, 1280) and feat.dim == 1280


def test_translation_is_by_rule():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = {"_blocks.0._depthwise_conv.weight": 0, "_blocks.3._depthwise_conv.weight": 1,
             "_blocks.3._bn2.bias": 2, "_blocks.3._expand_conv.weight": 3, "_bn1.weight": 4, "_conv_stem.weight": 5}
    out = backbones.efficientnet_pytorch_to_timm(state, model)
    # block 3 is the first block of stage 2 (stages of lite0: 1, 2, 2, 3, 3, 4, 1)
    assert out == {"blocks.0.0.conv_dw.weight": 0, "blocks.2.0.conv_dw.weight": 1, "blocks.2.0.bn3.bias": 2,
                   "blocks.2.0.conv_pw.weight": 3, "bn2.weight": 4, "conv_stem.weight": 5}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_keeps_pretrained_config(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_convnext", pretrained=False).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    b = build_backbone(bcfg("timm", model="test_convnext.r160_in1k", weights=str(path)))
    assert b.info["weights"] == str(path) and b.info["input_size"] == 160  # timm's pretrained config kept
    x = torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8)
    with torch.inference_mode():
        expected = source.forward_head(source.forward_features(b.model.normalize(x)), pre_logits=True)
        torch.testing.assert_close(b.model(x), expected)


def test_keras_avg_pool_is_plain_average_of_forward_features():
    torch.manual_seed(0)
    timm_pool = build_backbone(bcfg("timm", model="test_convnext", pretrained=False))
    torch.manual_seed(0)
    keras = build_backbone(bcfg("timm", model="test_convnext", pretrained=False, pool="keras_avg"))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        fmap = keras.model.model.forward_features(keras.model.normalize(x))
        torch.testing.assert_close(keras.model(x), fmap.mean(dim=(2, 3)))
        assert not torch.allclose(timm_pool.model(x), keras.model(x))  # ConvNeXt's head adds a LayerNorm


def test_image_size_override_and_pixels_baseline():
    b = build_backbone(bcfg("timm", model="test_efficientnet", pretrained=False, image_size=128))
    assert b.info["input_size"] == 128
    assert b.transform(Image.new("RGB", (300, 200))).shape == (3, 128, 128)
    px = build_backbone(bcfg("pixels"))
    img = Image.new("RGB", (90, 60), (255, 0, 51))
    x = px.transform(img).unsqueeze(0)
    out = px.model(x)
    assert px.dim == 32 * 32 * 3 and out.shape == (1, px.dim)
    np.testing.assert_allclose(out.view(3, 32, 32)[:, 0, 0].numpy(), [1.0, 0.0, 0.2], atol=1e-6)
    gray = build_backbone(bcfg("pixels", grayscale=True, image_size=16))
    assert gray.dim == 256 and gray.model(gray.transform(img).unsqueeze(0)).shape == (1, 256)


def test_unknown_names_and_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="backbone='resnet_nope' is not registered; choose one of: .*convnext_base"):
        build_backbone(OmegaConf.create({"name": "resnet_nope", "kind": "resnet_nope"}))
    with pytest.raises(UserError, match="backbone.model='no_such_net' is not a timm model"):
        build_backbone(bcfg("timm", model="no_such_net"))
    with pytest.raises(UserError, match="backbone.weights=.*missing.pth does not exist"):
        build_backbone(bcfg("convnext_tiny", weights=str(tmp_path / "missing.pth")))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # a hub that cannot be reached, wherever this runs
    with pytest.raises(UserError) as err:
        build_backbone(bcfg("convnext_tiny"))
    msg = str(err.value)
    assert "'convnext_tiny.fb_in1k' are not cached and hub.invalid cannot be reached" in msg
    assert "backbone.weights=/path/to/model.safetensors" in msg
    assert "backbone.pretrained=false" in msg
    # the download command is the one the installed huggingface_hub has (2.x: hf, no huggingface-cli)
    assert "hf download timm/convnext_tiny.fb_in1k" in msg and "huggingface-cli" not in msg


def test_weights_of_another_model_are_a_one_line_error_and_nothing_is_written(tmp_path):
    from safetensors.torch import save_file

    from .helpers import make_pinterest_export, run_verb

    other = build_backbone(bcfg("timm", model="test_convnext", pretrained=False)).model.model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "convnext.safetensors"))
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02 these bytes are not a checkpoint" * 100)
    export = make_pinterest_export(tmp_path / "exp", {("u", "cats"): "cats", ("u", "dogs"): "dogs"})
    work = tmp_path / "work"
    for weights, message in ((tmp_path / "convnext.safetensors", r"does not fit test_efficientnet: \d+ missing keys "
                              r"\(blocks\.0\.0\.bn1\.bias, [^)]+\); \d+ unexpected keys \(head\.norm\.bias, "),
                             (tmp_path / "garbage.pth", r"is not a checkpoint \(UnpicklingError\)")):
        proc = run_verb("extract", f"paths.work={work}", f"data.root={export}", "backbone=test_efficientnet",
                        "backbone.pretrained=true", f"backbone.weights={weights}", "mlflow.enabled=false", cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert re.search(f"error: backbone.weights={weights} " + message, proc.stderr), proc.stderr
        assert not (work / "exp" / "embeddings").exists()  # no store was started


def test_a_config_written_in_code_takes_its_defaults_from_the_yaml(tmp_path, monkeypatch):
    """The backbone YAML is the one place of the defaults: change it, and a partial config follows."""
    import shutil

    from pinterest_cls.core import config

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    (conf / "backbone" / "pixels.yaml").write_text("name: pixels\nkind: pixels\nimage_size: 20\ngrayscale: true\n"
                                                   "pool: timm\n")
    monkeypatch.setattr(config, "CONF_DIR", str(conf))
    b = build_backbone({"name": "p", "kind": "pixels"})
    assert (b.info["input_size"], b.info["grayscale"], b.dim) == (20, True, 400)
    b = build_backbone({"name": "p", "kind": "pixels", "image_size": 8})  # what is given wins
    assert (b.info["input_size"], b.dim) == (8, 64)


def test_the_weights_cache_command_names_the_13_study_repositories():
    """The one-liner of the extract guide that fills a shared weights cache: one hub repository per study backbone."""
    import subprocess
    import sys

    code = ("from pinterest_cls.embed.registry import REGISTRY, STUDY_BACKBONES; "
            "print(*(f'timm/{REGISTRY[n].model}' for n in STUDY_BACKBONES), sep='\\n')")
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "extract.md").read_text()
    assert code in guide
    repos = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(repos) == 13 and repos[0] == "timm/convnext_tiny.fb_in1k" and repos[-1] == "timm/legacy_xception.tf_in1k"


def _sample_photo(path: Path, size: tuple[int, int]) -> Path:
    """scikit-learn's china.jpg, resized to ``size`` and saved as a JPEG: a real photograph."""
    Image.fromarray(np.asarray(load_sample_images().images[0])).resize(size, Image.BICUBIC).save(path, quality=90)
    return path


@pytest.mark.parametrize("kind", ["efficientnet_lite0", "pixels"])
def test_the_tensor_resize_gives_the_pil_resizes_pixels_but_for_rounding(tmp_path, kind):
    from pinterest_cls.data.images import load_rgb

    photo = _sample_photo(tmp_path / "p.jpg", (736, 1100))  # a real-size pin, portrait
    tensor, pil = build_backbone(kind, resize="tensor"), build_backbone(kind, resize="pil")
    image = load_rgb(photo, min_size=tensor.resize_size)  # draft-decoded, as the workers do
    a, b = tensor.transform(image), pil.transform(image)
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape and a.is_contiguous()
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 3 and diff.float().mean() < 0.05  # the same geometry, the same filter
    assert tensor.info["resize"] == "tensor" and pil.info["resize"] == "pil"
    assert repr(tensor.transform) != repr(pil.transform)  # one decode for many backbones keeps them apart
    shifted = (a.int() - torch.roll(b, 1, dims=2).int()).abs().float().mean()
    assert shifted > 20 * diff.float().mean()  # a crop one pixel off would show


def test_a_resize_or_interpolation_without_a_tensor_kernel_is_a_one_line_error():
    with pytest.raises(UserError, match=r"extract.resize='cv2' must be one of: tensor, pil"):
        build_backbone("pixels", resize="cv2")
    bcfg = {"name": "t", "kind": "timm", "model": "test_efficientnet", "pretrained": False, "interpolation": "lanczos"}
    with pytest.raises(UserError, match=r"interpolation 'lanczos' has no tensor resize; use extract.resize=pil"):
        build_backbone(bcfg)
    assert build_backbone(bcfg, resize="pil").info["interpolation"] == "lanczos"
