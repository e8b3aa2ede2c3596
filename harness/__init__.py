"""vllm-tune: find, by measurement, the best vLLM serving configuration for a model on a GPU node.

Data flow (one sub-package each): space -> plan -> launch -> load -> measure -> study -> emit / report.
"""

__version__ = "0.1.0"
