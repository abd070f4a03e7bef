"""The installed package: `import dsla` registers everything quietly; console script works."""
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_import_registers_everything_without_warnings():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import dsla\n"
        "from detectron2.modeling import META_ARCH_REGISTRY, BACKBONE_REGISTRY\n"
        "from detectron2.data import DatasetCatalog\n"
        "assert all(n in META_ARCH_REGISTRY for n in ('DSLA', 'FCOSPlain', 'FCOSDetectron2'))\n"
        "assert 'build_dsla_resnet_fpn_backbone' in BACKBONE_REGISTRY\n"
        "assert {'shapes_train', 'shapes_val'} <= set(DatasetCatalog.list())\n"
        "print(dsla.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    # The editable install imports from the source tree.
    assert proc.stdout.strip() == os.path.join(REPO, "projects", "DSLA", "dsla", "__init__.py")


def test_console_script():
    exe = shutil.which("dsla-train", path=os.path.dirname(sys.executable))
    assert exe, "dsla-train is not installed next to the interpreter"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--register-coco" in proc.stdout
