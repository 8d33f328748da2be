"""The explanation methods, one module each; `METHODS` maps a method's name to its declaration."""

from . import ablationcam, cam, gradients, occlusion, opticam, rise, scorecam
from .base import Event, Job, Maps, Method, Param, ParamError, Progress

METHODS: dict[str, Method] = {m.name: m for m in (occlusion.METHOD, *gradients.METHODS, *cam.METHODS,
                                                  scorecam.METHOD, ablationcam.METHOD, rise.METHOD, opticam.METHOD)}

__all__ = ["METHODS", "Event", "Job", "Maps", "Method", "Param", "ParamError", "Progress"]
