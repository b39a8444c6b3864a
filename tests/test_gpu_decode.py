"""extract.decode=gpu, the parts that run anywhere: which files go to nvJPEG, the resize that replaces the CPU
transform, the decoder stage with its CPU fallback (torchvision's decode_jpeg also runs on the CPU), and the
refusal without CUDA. The CUDA runs are in test_gpu.py."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from pinterest_cls.data.gpu_decode import GpuDecoder, gpu_decodable, resize_of
from pinterest_cls.data.loader import PinDataset, make_loader
from pinterest_cls.embed.backbones import build_backbone

from .helpers import make_cfg, run_verb


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A crop of one of scikit-learn's two sample photos (427x640), resized to ``size``."""
    rng = np.random.default_rng(seed)
    pic = load_sample_images().images[seed % 2]
    h, w = rng.integers(200, 400), rng.integers(200, 600)
    top, left = rng.integers(0, pic.shape[0] - h + 1), rng.integers(0, pic.shape[1] - w + 1)
    return Image.fromarray(pic[top:top + h, left:left + w]).resize(size, Image.BICUBIC)


def jpeg(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **save)
    return buf.getvalue()


def without_scan_data(data: bytes) -> bytes:
    """A JPEG whose header is complete and baseline (so it is sent to the decoder) but that holds no image
    data: the JPEG decoder refuses it, and the CPU path then reports it."""
    return data[:data.index(b"\xff\xda")] + b"\xff\xd9"


def odd_files(seed: int = 50) -> dict[str, bytes]:
    """One file of each kind nvJPEG must not take (name -> bytes): all decode on the CPU path."""
    im = photo(seed)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    png = io.BytesIO()
    im.save(png, "PNG")
    return {"progressive": jpeg(im, progressive=True, quality=90), "cmyk": jpeg(im.convert("CMYK")),
            "gray": jpeg(im.convert("L")), "png": png.getvalue(), "rotated": jpeg(im, exif=exif.tobytes())}


def write_photo_export(root, n_baseline: int, odd: bool = True, size=(320, 240)):
    """A pinterest-layout export of real photo crops: ``n_baseline`` baseline JPEGs (two boards per
    category) and, with ``odd``, the files of :func:`odd_files` on a board of their own."""
    files = {f"p{i:03d}": jpeg(photo(i, size), quality=90) for i in range(n_baseline)}
    boards = {}
    for i, name in enumerate(files):
        boards.setdefault(("ann", f"b{i % 4}", ["china", "flower"][i % 2]), []).append(name)
    if odd:
        extra = odd_files()
        files.update(extra)
        boards[("bob", "odd", "china")] = list(extra)
    for (user, board, category), names in boards.items():
        folder = root / user / "per_board" / board
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "board_category.txt").write_text(category)
        for name in names:
            (folder / name).mkdir()
            (folder / name / "pin_closeup_image.jpg").write_bytes(files[name])
    return root


def test_only_complete_baseline_rgb_jpegs_go_to_the_gpu(tmp_path):
    im = photo(1)
    base = tmp_path / "base.jpg"
    base.write_bytes(jpeg(im))
    assert gpu_decodable(str(base), 10**9) == base.read_bytes()
    for name, data in odd_files().items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        assert gpu_decodable(str(path), 10**9) is None, name
    cut = tmp_path / "cut.jpg"  # truncated after the scan: the CPU path reports it
    cut.write_bytes(base.read_bytes()[:-200])
    assert gpu_decodable(str(cut), 10**9) is None
    with pytest.raises(Exception, match=r"image larger than 1000 pixels \(320x240 JPEG\)"):
        gpu_decodable(str(base), 1000)
    with pytest.raises(Exception, match="file not found"):
        gpu_decodable(str(tmp_path / "gone.jpg"), 10**9)


@pytest.mark.parametrize("bcfg", [{"name": "p", "kind": "pixels", "image_size": 40},
                                  {"name": "t", "kind": "timm", "model": "test_efficientnet", "pretrained": False,
                                   "image_size": 64}])
def test_gpu_resize_matches_the_cpu_transform(bcfg):
    from omegaconf import OmegaConf

    backbone = build_backbone(OmegaConf.create(bcfg))
    resize = resize_of(backbone)
    for seed, size in [(0, (320, 240)), (1, (241, 500)), (2, (500, 333))]:
        im = photo(seed, size)
        cpu = backbone.transform(im)
        gpu = resize(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None])[0]
        assert gpu.shape == cpu.shape and gpu.dtype == torch.uint8
        diff = (gpu.int() - cpu.int()).abs().float()
        assert diff.mean() < 0.25 and diff.max() <= 12, (size, diff.mean(), diff.max())


def sent(path) -> bool:
    """Whether the worker sends ``path`` to the JPEG decoder (a header Pillow cannot read fails there)."""
    try:
        return gpu_decodable(path, 10**9) is not None
    except Exception:
        return False


def test_decoder_stage_orders_rows_falls_back_and_keeps_failures(tmp_path):
    """The encoded loader + GpuDecoder (here on the CPU device) give, row for row, pixels within rounding of the
    CPU path; the odd files come from the CPU path itself, bit for bit; a file broken after the listing fails
    in the worker, one that the JPEG decoder refuses goes back to the CPU path, which fails it with its own
    reason: both for their own row only."""
    from omegaconf import OmegaConf

    root = write_photo_export(tmp_path / "exp", 10)
    paths = sorted(str(p) for p in root.rglob("pin_closeup_image.jpg"))
    broken = paths[3]
    with open(broken, "wb") as f:
        f.write(b"no longer a jpeg")
    refused = paths[5]
    with open(refused, "rb") as f:
        data = f.read()
    with open(refused, "wb") as f:
        f.write(without_scan_data(data))
    backbones = [build_backbone(OmegaConf.create({"name": "p", "kind": "pixels", "image_size": 48})),
                 build_backbone(OmegaConf.create({"name": "q", "kind": "pixels", "image_size": 48})),
                 build_backbone(OmegaConf.create({"name": "r", "kind": "pixels", "image_size": 32}))]
    args = (paths, range(len(paths)), [b.transform for b in backbones], [b.resize_size for b in backbones])
    cpu_rows, cpu_px, cpu_failed = next(iter(make_loader(PinDataset(*args), 64, 0, pin_memory=False)))
    dataset = PinDataset(*args, encoded=True)
    decoder = GpuDecoder(dataset, backbones, torch.device("cpu"))
    rows, payload, failed = next(iter(make_loader(dataset, 64, 2, pin_memory=False)))
    assert sorted(payload["decoded"]) == [i for i, p in enumerate(paths) if "/odd/" in p]
    assert payload["encoded"]["rows"] == [i for i, p in enumerate(paths) if sent(p)]
    assert 3 not in payload["encoded"]["rows"]
    assert payload["encoded"]["offsets"][-1] == len(payload["encoded"]["buffer"])
    rows, pixels, failed = decoder(rows, payload, failed)
    assert sorted(failed) == sorted(cpu_failed) == [(3, "cannot identify image file"), (5, cpu_failed[1][1])]
    assert cpu_failed[1][1]  # the CPU path's own reason
    assert rows.tolist() == cpu_rows.tolist() == [i for i in range(len(paths)) if i not in (3, 5)]
    odd = [k for k, r in enumerate(rows.tolist()) if "/odd/" in paths[r]]
    assert decoder.counts == {"gpu": len(rows) - len(odd), "cpu": len(odd)}
    assert pixels[1] is pixels[0]  # the same resize is computed once
    for k in (0, 2):
        assert pixels[k].dtype == torch.uint8 and pixels[k].shape == cpu_px[k].shape
        assert torch.equal(pixels[k][odd], cpu_px[k][odd])
        diff = (pixels[k].int() - cpu_px[k].int()).abs().float()
        assert diff.mean() < 1.0, diff.mean()


def test_decode_gpu_without_cuda_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = write_photo_export(tmp_path / "exp", 4, odd=False)
    work = tmp_path / "work"
    proc = run_verb("extract", f"paths.work={work}", f"data.root={root}", "backbone=pixels",
                    "extract.decode=gpu", "mlflow.enabled=false", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: extract.decode=gpu needs a CUDA device, but extract.device=auto resolved to cpu; "
        "use extract.decode=cpu")
    assert not (work / "exp" / "embeddings").exists()
    shutil.rmtree(work)
    cfg = make_cfg("extract", [f"paths.work={work}", f"data.root={root}", "extract.decode=jpeg"])
    from pinterest_cls.core.errors import UserError
    from pinterest_cls.extract import extract

    with pytest.raises(UserError, match=r"extract.decode='jpeg' must be cpu"):
        extract(cfg, progress=False)


def test_an_interpolation_without_gpu_resize_is_refused_before_any_work():
    from omegaconf import OmegaConf

    from pinterest_cls.core.errors import UserError

    backbone = build_backbone(OmegaConf.create({"name": "t", "kind": "timm", "model": "test_efficientnet",
                                                "pretrained": False, "image_size": 64, "interpolation": "lanczos"}),
                              resize="pil")  # the tensor resize has no lanczos either (test_backbones)
    with pytest.raises(UserError, match=r"backbone t resizes with 'lanczos' interpolation, which has no GPU resize "
                                        r"\(bicubic, bilinear, nearest\); use extract.decode=cpu"):
        GpuDecoder(None, [backbone], torch.device("cpu"))
