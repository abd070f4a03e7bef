"""The command-line tools, importable as modules and installed as console scripts (setup.py):

    dsla-train                  training / evaluation (dsla.engine)
    dsla-demo                   ``make demo``: train, evaluate and draw on the built-in dataset
    dsla-predict                detections of a trained model drawn on your images
    dsla-visualize-assignment   DSLA's smooth labels next to FCOS's hard labels
    dsla-analyze-consistency    score-IoU consistency of a trained model
    dsla-export                 TorchScript or ONNX export, checked against the eager model
    dsla-convert-mmdet          the authors' mmdetection checkpoints to detectron2

``python -m dsla.tools.<name>`` runs the same code.
"""
import os

# The checkout this package lives in (``pip install -e .``): the default configs and the demo's
# output folder are found from here.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))
