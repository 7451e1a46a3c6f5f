"""Training FNeVR: the objective (:mod:`fnevr.train.losses`), the loop (:class:`Trainer`), sample grids."""

from .trainer import TrainOptions, Trainer

__all__ = ["TrainOptions", "Trainer"]
