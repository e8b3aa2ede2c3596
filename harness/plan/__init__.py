"""The planner: knows before launching whether a vLLM configuration can run on a node, and what it will give.

A sweep calls `plan_candidate` for every candidate and starts a server only for feasible ones; `python -m harness.plan`
lints a user's existing config and reports how much of a search space is feasible, with no GPU time spent.
"""

from harness.plan.candidate import Plan, plan_candidate
from harness.plan.checks import Finding
from harness.plan.hardware import GPU_CATALOG, Hardware, detect_hardware, gpu_spec
from harness.plan.modelfacts import ModelFacts, load_model_facts

__all__ = ["Finding", "Hardware", "ModelFacts", "Plan", "GPU_CATALOG", "detect_hardware", "gpu_spec",
           "load_model_facts", "plan_candidate"]
