"""Training FNeVR: the objective (:mod:`fnevr.train.losses`), the loop (:class:`Trainer`), sample grids."""

from .trainer import Trainer, TrainOptions

__all__ = ["TrainOptions", "Trainer"]
