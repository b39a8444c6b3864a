"""How far extract.decode=gpu is from decode=cpu, and why: pixels and features, by chroma subsampling.

    python experiments/throughput/gpu_decode_agreement.py [--n 40]

For N crops of scikit-learn's two sample photos (real photographs), each saved as a baseline JPEG with 4:2:0
chroma (Pillow's default, and what most web JPEGs use) and with 4:4:4: the mean absolute pixel difference
between nvJPEG (the GPU decoder extract uses) and Pillow/libjpeg (the CPU path), and the row cosine between
efficientnet_lite0 features (real weights, fp32) of the two decodes after the backbone's own preprocessing
(CPU transform vs the GPU resize). Needs CUDA.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_sample_images

from pinterest_cls.data.gpu_decode import jpeg_decoder, resize_of
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.runner import Runner, prepare_model


def crops(n: int, size=(320, 240)):
    pics = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        pic = pics[i % 2]
        h, w = rng.integers(200, 400), rng.integers(200, 600)
        top, left = rng.integers(0, pic.shape[0] - h + 1), rng.integers(0, pic.shape[1] - w + 1)
        yield Image.fromarray(pic[top:top + h, left:left + w]).resize(size, Image.BICUBIC)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    device = torch.device("cuda")
    decode, name = jpeg_decoder()
    backbone = build_backbone(OmegaConf.create({"name": "efficientnet_lite0", "kind": "efficientnet_lite0"}))
    runner = Runner(prepare_model(backbone.model, device, True, False), device, None, True)
    resize = resize_of(backbone)
    images = list(crops(args.n))
    print(f"{torch.cuda.get_device_name(0)}, JPEG decoder {name}, {args.n} photo crops 320x240, quality 90")
    for label, subsampling in (("4:2:0", 2), ("4:4:4", 0)):
        datas = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90, subsampling=subsampling)
            datas.append(buf.getvalue())
        pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
        gpu = decode([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], device)
        pixel = np.mean([np.abs(np.asarray(p, np.int16) - g.permute(1, 2, 0).cpu().numpy().astype(np.int16)).mean()
                         for p, g in zip(pil, gpu)])
        a = runner(torch.stack([backbone.transform(p) for p in pil]))
        b = runner(torch.cat([resize(g[None]) for g in gpu]))
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"{label}: mean |nvJPEG - Pillow| {pixel:.3f} per channel value; feature row cosine min "
              f"{cos.min():.5f} mean {cos.mean():.5f}", flush=True)


if __name__ == "__main__":
    main()
