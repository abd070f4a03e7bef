"""LR schedules for the DSLA LazyConfigs, written with the yacs keys of the same recipe so that
the two read alike."""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def warmup_multistep(steps, max_iter, warmup_iters, warmup_factor, warmup_method, gamma=0.1):
    """
    ``lr_multiplier`` of yacs' ``WarmupMultiStepLR`` (``SOLVER.STEPS``, ``MAX_ITER``,
    ``WARMUP_ITERS``, ``WARMUP_FACTOR``, ``WARMUP_METHOD``, ``GAMMA``), as detectron2's
    ``build_lr_scheduler`` builds it. Like every LazyConfig schedule it is defined on the fraction
    of training done: overriding ``train.max_iter`` stretches the steps and the warm-up with it.
    """
    steps = [s for s in steps if s <= max_iter]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)],
            milestones=steps,
            num_updates=max_iter,
        ),
        warmup_length=min(warmup_iters / max_iter, 1.0),
        warmup_method=warmup_method,
        warmup_factor=warmup_factor,
    )
