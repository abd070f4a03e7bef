from detectron2.config import CfgNode as CN


def add_dsla_config(cfg):
    """Placeholder, filled in by the model issue."""
    cfg.MODEL.DSLA = CN()
