"""onnxruntime vs eager PyTorch on the CPU, for ``dsla-export --format onnx`` (docs/DEPLOY.md).

1. Parity on a trained model (``--weights``, the demo's): the 150 ``shapes_easy_val`` images at
   the test size and two other sizes; per image the same count, matched one to one with the same
   class, box within 0.01 px, score within 1e-4; and COCO box AP of each engine's detections.
2. Parity on the R-50 authors' layout (random weights, classifier spread) at 800x1216.
3. Latency (demo at 256 px, R-50 at 800x1333; 1, 2 threads), engines alternating: ORT / eager.

    python benchmarks/onnx_speed.py --weights output/demo/model_final.pth
"""
import argparse
import os
import sys
import tempfile
import time
from statistics import median

import torch

from common import REPO, log, machine_info, markdown_table, write_results

sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import tiny_cfg  # noqa: E402
from test_onnx_export import (  # noqa: E402
    SPREAD_OPTS, assert_same_detections, onnx_instances, same_detections, spread_model)

import onnxruntime  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from dsla import deploy  # noqa: E402
from dsla.checkpoint import load_weights  # noqa: E402
from dsla.tools.export_model import model_input  # noqa: E402

DEMO = os.path.join(REPO, "configs", "Shapes", "dsla_R_18_FPN_demo.yaml")
R50 = os.path.join(REPO, "configs", "COCO-Detection", "dsla_R_50_FPN_1x_mmdet.yaml")


def export(model, cfg, path):
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255
    divisibility = model.backbone.size_divisibility
    deploy.export_onnx(model, image, path, deploy.metadata_props(cfg, None, divisibility))
    return session(path)


def session(path, threads=0):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def trained_demo(weights):
    cfg = tiny_cfg("MODEL.WEIGHTS", weights, config_file=DEMO)
    model = build_model(cfg).eval()
    load_weights(model, weights)
    return model, cfg


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
        for e in evaluators.values():
            e.reset()
        failures = 0
        records = DatasetCatalog.get(name)[:num_images]
        for record in records:
            image = model_input(cfg, record["file_name"])
            with torch.no_grad():
                eager = model([{"image": image}])[0]["instances"]
            exported = onnx_instances(session, image)
            failures += not same_detections(eager, exported)
            for engine, instances in (("eager", eager), ("ort", exported)):
                evaluators[engine].process([record], [{"instances": detector_postprocess(
                    instances, record["height"], record["width"])}])
        ap = {k: e.evaluate()["bbox"]["AP"] for k, e in evaluators.items()}
        rows.append({"size": size, "images": len(records), "images_differing": failures,
                     "AP_eager": ap["eager"], "AP_ort": ap["ort"]})
        log(f"demo parity at {size}: {rows[-1]}")
    return rows


def latency(model, path, size, threads, repeats):
    """Median seconds per image of eager and of onnxruntime (export at ``path``), alternating."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(3)) * 255
    torch.set_num_threads(threads)
    ort_session = session(path, threads)
    runs = {"eager": lambda: model([{"image": image}]),
            "ort": lambda: deploy.run_onnx(ort_session, image)}
    times = {"eager": [], "ort": []}
    for i in range(repeats + 1):  # the first round warms both up
        for engine, run in runs.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
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
        r50_count = assert_same_detections(r50, session, image)  # raises if any differs
        demo, _ = trained_demo(args.weights)
        speed = [latency(demo, os.path.join(tmp, "demo.onnx"), (256, 256), t, args.repeats)
                 for t in (1, 2)]
        speed += [latency(r50, os.path.join(tmp, "r50.onnx"), (800, 1333), t,
                          max(2, args.repeats // 2 + 1)) for t in (1, 2)]
    md = (f"Parity, demo model (`{os.path.relpath(args.weights, REPO)}`), `shapes_easy_val`:\n\n"
          + markdown_table(["test size", "images", "differing", "AP eager", "AP onnxruntime"],
                           [(r["size"], r["images"], r["images_differing"],
                             f"{r['AP_eager']:.2f}", f"{r['AP_ort']:.2f}") for r in parity])
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
