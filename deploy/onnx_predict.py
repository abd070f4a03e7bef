#!/usr/bin/env python3
"""
Detect objects in one image with a DSLA model exported by ``dsla-export --format onnx``, using
only onnxruntime, numpy and Pillow (no PyTorch, no detectron2).

Everything besides the pixels comes from the ONNX file's metadata: the class names, the channel
order the model takes (BGR or RGB) and the test-time resize (shorter side to ``min_size_test``,
longer side at most ``max_size_test``, bilinear: detectron2's ``ResizeShortestEdge``).
Normalisation, padding, NMS and the top-N are inside the graph. Boxes are scaled back to the
image's own pixels, clipped, and empty ones dropped, as detectron2's ``detector_postprocess``.

Prints one line per detection scoring at least ``--score-threshold`` (class, score, box x0 y0 x1
y1) and, with ``--output``, draws them into a PNG.

    pip install onnxruntime numpy pillow
    python deploy/onnx_predict.py out/export/model.onnx photo.jpg --output out/photo.png
"""
import argparse
import json
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageOps

# metadata_props["format"] of a DSLA export (dsla.deploy.FORMAT_NAME).
FORMAT_NAME = "dsla-detector"
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60)]


class DeployError(Exception):
    """A bad input of this example; printed as one line."""


def load_model(path):
    """Returns (onnxruntime session, metadata dict) of a DSLA export at ``path``."""
    try:
        import onnxruntime
    except ImportError:
        raise DeployError("this example needs onnxruntime: pip install onnxruntime") from None
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for missing / invalid files
        raise DeployError(f"cannot load {path} as an ONNX model: {str(e).splitlines()[0]}")
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != FORMAT_NAME:
        raise DeployError(f"{path} is not a DSLA export (its metadata has no format "
                          f"'{FORMAT_NAME}'): export the model with dsla-export --format onnx")
    return session, meta


def read_image(path):
    """The image at ``path`` as ``[H, W, 3]`` uint8 RGB, EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except OSError as e:  # missing, not an image, truncated
        raise DeployError(f"cannot read {path} as an image: {e}") from None


def resized_shape(height, width, short, max_size):
    """detectron2's ``ResizeShortestEdge.get_output_shape``: (new H, new W)."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def model_input(rgb, meta):
    """``[3, h, w]`` float32 in the model's channel order, resized as at test time."""
    height, width = rgb.shape[:2]
    new_h, new_w = resized_shape(height, width, int(meta["min_size_test"]),
                                 int(meta["max_size_test"]))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    if meta["input_format"] == "BGR":
        resized = resized[:, :, ::-1]
    return np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)


def detect(session, meta, rgb):
    """
    Returns:
        boxes ``[D, 4]`` xyxy in ``rgb``'s pixels, scores ``[D]``, classes ``[D]``, best first.
    """
    image = model_input(rgb, meta)
    boxes, scores, classes = session.run(["boxes", "scores", "classes"], {"image": image})
    height, width = rgb.shape[:2]
    boxes[:, 0::2] *= width / image.shape[2]
    boxes[:, 1::2] *= height / image.shape[1]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], scores[keep], classes[keep]


def draw(rgb, boxes, scores, classes, names, path):
    picture = Image.fromarray(rgb)
    pen = ImageDraw.Draw(picture)
    for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
        color = COLORS[cls % len(COLORS)]
        pen.rectangle(box, outline=color, width=2)
        pen.text((box[0] + 2, box[1] + 1), f"{names[cls]} {score:.2f}", fill=color)
    picture.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("model", help="model.onnx written by dsla-export --format onnx")
    parser.add_argument("image", help="image file")
    parser.add_argument("--output", help="PNG to draw the detections into")
    parser.add_argument("--score-threshold", type=float, default=0.4,
                        help="detections below it are neither printed nor drawn (default 0.4, "
                        "as dsla-predict)")
    args = parser.parse_args(argv)
    try:
        session, meta = load_model(args.model)
        rgb = read_image(args.image)
    except DeployError as e:
        sys.exit(f"error: {e}")
    boxes, scores, classes = detect(session, meta, rgb)
    keep = scores >= args.score_threshold
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    names = json.loads(meta["class_names"])
    print(f"{args.image}: {len(scores)} detections with score >= {args.score_threshold}")
    for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
        print(f"{names[cls]:>12s} {score:.4f}  " + " ".join(f"{v:8.2f}" for v in box))
    if args.output:
        draw(rgb, boxes, scores, classes, names, args.output)
        print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
