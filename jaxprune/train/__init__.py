"""Training: the device mesh, optimizers and schedules, the jitted step, epoch loops.

    from jaxprune.train import Trainer, Data, fit, make_mesh
    mesh = make_mesh()
    data = Data(cfg, mesh)
    trainer = Trainer(m, cfg.train, steps_per_epoch=data.steps_per_epoch(), mesh=mesh, hooks=...)
    trainer.start_round()
    records = fit(trainer, data, cfg.train.epochs, journal=Journal(run_dir))
    records[-1]                     # last epoch: losses, accuracies, the hooks' site metric
"""
from jaxprune.train.loop import Data, Diverged, Journal, evaluate_model, fit, train_epoch
from jaxprune.train.mesh import AXIS, fetch, make_mesh, replicate, replicated
from jaxprune.train.optim import make_optimizer, make_schedule
from jaxprune.train.trainer import Trainer

__all__ = ["AXIS", "Data", "Diverged", "Journal", "Trainer", "evaluate_model", "fetch", "fit",
           "make_mesh", "make_optimizer", "make_schedule", "replicate", "replicated",
           "train_epoch"]
