"""Samplers with trajectories and log-probs, inversion, and SPO's step-wise resampler.

This file is the menu: every sampler is imported (and registered) here.
"""

from diffalign.registry import Registry

from .base import SampleOutput, gaussian_log_prob, guided
from .ddim import NoiseSchedule, ddim_sample, ddim_step, ddpm_sample
from .flow import flow_sample, flow_sde_scheduler, flow_sde_step
from .inversion import InversionOutput, ddim_invert
from .stepwise import StepwiseOutput, stepwise_resample

SAMPLERS: Registry = Registry("sampler")
SAMPLERS.register("ddim")(ddim_sample)
SAMPLERS.register("ddpm")(ddpm_sample)
SAMPLERS.register("flow_euler")(flow_sample)

__all__ = [
    "SAMPLERS",
    "SampleOutput",
    "gaussian_log_prob",
    "guided",
    "NoiseSchedule",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "flow_sample",
    "flow_sde_scheduler",
    "flow_sde_step",
    "InversionOutput",
    "ddim_invert",
    "StepwiseOutput",
    "stepwise_resample",
]
