"""
onnxruntime vs eager PyTorch on the CPU, for ``dsla-export --format onnx`` (docs/DEPLOY.md).

1. Parity on a trained model (``--weights``, the demo's): the 150 ``shapes_easy_val`` images at
   the test size and two other sizes; per image same count and classes, boxes within 0.01 px,
   scores within 1e-4; and COCO box AP of each engine's detections.
2. Parity on the R-50 authors' layout (random weights, classifier spread, threshold 0.2) at
   800x1216.
3. Latency, demo model at 256 px and R-50 at 800x1333, 1 and 2 threads: eager and onnxruntime
   runs alternate, medians, ratio ORT / eager from the same run.

    python benchmarks/onnx_speed.py --weights output/demo/model_final.pth
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from common import REPO, log, machine_info, markdown_table, median, write_results

sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import tiny_cfg  # noqa: E402
from test_onnx_export import SPREAD_OPTS, assert_same_detections, spread_model  # noqa: E402

import onnxruntime  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from dsla import deploy  # noqa: E402
from dsla.checkpoint import load_weights  # noqa: E402
from dsla.tools.export_model import model_input  # noqa: E402

DEMO = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_demo.yaml")
R50 = os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_50_FPN_1x_mmdet.yaml")


def export(model, cfg, path, threads=None, size=(256, 256)):
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)) * 255
    deploy.export_onnx(model, image, path, deploy.metadata_props(cfg, None, 128))
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def trained_demo(weights):
    cfg = tiny_cfg("MODEL.WEIGHTS", weights, config_file=DEMO)
    model = build_model(cfg).eval()
    load_weights(model, weights)
    return model, cfg


def ort_instances(session, image, record):
    boxes, scores, classes = deploy.run_onnx(session, image)
    out = Instances(tuple(image.shape[1:]), pred_boxes=Boxes(boxes), scores=scores,
                    pred_classes=classes)
    return detector_postprocess(out, record["height"], record["width"])


def demo_parity(weights, tmp, sizes, num_images):
    """Per test size: images whose detections differ, and COCO AP of each engine."""
    rows = []
    model, cfg = trained_demo(weights)
    session = export(model, cfg, os.path.join(tmp, "demo.onnx"))  # dynamic H, W: one for all
    for size in sizes:
        cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size),
                       config_file=DEMO)
        name = cfg.DATASETS.TEST[0]
        evaluators = {k: COCOEvaluator(name, output_dir=None) for k in ("eager", "ort")}
        failures = 0
        for e in evaluators.values():
            e.reset()
        records = DatasetCatalog.get(name)[:num_images]
        for record in records:
            image = model_input(cfg, record["file_name"])
            inputs = [{"image": image, **{k: record[k] for k in ("height", "width", "image_id")}}]
            with torch.no_grad():
                eager = model(inputs)
            try:
                assert_same_detections(model, session, image, minimum=0)
            except AssertionError:
                failures += 1
            evaluators["eager"].process(inputs, eager)
            evaluators["ort"].process(inputs, [{"instances": ort_instances(session, image,
                                                                           record)}])
        ap = {k: e.evaluate()["bbox"]["AP"] for k, e in evaluators.items()}
        rows.append({"size": size, "images": len(records),
                     "images_differing": failures, "AP_eager": ap["eager"], "AP_ort": ap["ort"]})
        log(f"demo parity at {size}: {rows[-1]}")
    return rows


def latency(model, path, cfg, size, threads, repeats):
    """Median seconds per image of eager and onnxruntime, runs alternating."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(3)) * 255
    torch.set_num_threads(threads)
    session = export(model, cfg, path, threads)
    times = {"eager": [], "ort": []}
    for i in range(repeats + 1):  # the first round warms both up
        for engine in ("eager", "ort"):
            start = time.perf_counter()
            with torch.no_grad():
                model([{"image": image}]) if engine == "eager" else deploy.run_onnx(session, image)
            if i:
                times[engine].append(time.perf_counter() - start)
    eager, ort = median(times["eager"]), median(times["ort"])
    log(f"latency {size} {threads} thread(s): eager {eager:.3f}s ort {ort:.3f}s")
    return {"size": list(size), "threads": threads, "eager_s": eager, "ort_s": ort,
            "ratio": ort / eager, "repeats": repeats}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="trained demo model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 192, 352])
    parser.add_argument("--repeats", type=int, default=5, help="latency rounds (R-50: 3)")
    parser.add_argument("--images", type=int, default=150, help="validation images (all: 150)")
    parser.add_argument("--name", default="onnx_speed")
    args = parser.parse_args()
    info = {**machine_info(), "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        parity = demo_parity(args.weights, tmp, args.sizes, args.images)
        r50_cfg = tiny_cfg(*SPREAD_OPTS, config_file=R50)
        r50 = spread_model(r50_cfg)
        session = export(r50, r50_cfg, os.path.join(tmp, "r50.onnx"))
        image = torch.rand(3, 800, 1216, generator=torch.Generator().manual_seed(4)) * 255
        r50_count = assert_same_detections(r50, session, image)
        log(f"R-50 parity at 800x1216: {r50_count} detections equal")
        demo, demo_cfg = trained_demo(args.weights)
        speed = [latency(demo, os.path.join(tmp, "d.onnx"), demo_cfg, (256, 256), t, args.repeats)
                 for t in (1, 2)]
        speed += [latency(r50, os.path.join(tmp, "r.onnx"), r50_cfg, (800, 1333), t,
                          max(2, args.repeats // 2 + 1)) for t in (1, 2)]
    md = ("Parity, demo model (`" + os.path.relpath(args.weights, REPO) + "`), `shapes_easy_val`:\n\n"
          + markdown_table(["test size", "images", "images differing", "AP eager", "AP onnxruntime"],
                           [(r["size"], r["images"], r["images_differing"], f"{r['AP_eager']:.2f}",
                             f"{r['AP_ort']:.2f}") for r in parity])
          + f"\nR-50 authors' layout at 800x1216: {r50_count} detections, all equal.\n\n"
          + markdown_table(["model", "input", "threads", "eager s", "onnxruntime s",
                            "ratio ORT/eager"],
                           [("demo R-18" if s["size"][0] == 256 else "R-50", "x".join(
                               map(str, s["size"])), s["threads"], f"{s['eager_s']:.3f}",
                             f"{s['ort_s']:.3f}", f"{s['ratio']:.2f}") for s in speed])
          + f"\nMachine: {info['cpu']}, {info['logical_cpus']} CPUs, load "
          f"{info['load_average_1_5_15']}; torch {info['torch']}, onnxruntime "
          f"{info['onnxruntime']}.\n")
    write_results(args.name, {"machine": info, "parity": parity, "r50_parity_detections":
                              r50_count, "latency": speed}, md)


if __name__ == "__main__":
    main()
