"""The node plan: split one node's GPUs between several models so that each sustains its expected traffic.

sweep file + traffic -> capacity per model and GPU count (measured studies, else the planner's estimate)
-> allocation (disjoint GPU sets, exact search) -> configs/node.yaml (`vllm_instances:`) -> confirmation.
"""

from harness.node.allocate import Allocation, Assignment, Candidate, Demand, Shortfall, allocate
from harness.node.build import NodePlan, build_plan
from harness.node.capacity import CapacityRow
from harness.node.confirm import NodeConfirmation, confirm_plan
from harness.node.emit import write_node_config
from harness.node.estimate import Estimate, Shape, estimate_capacity
from harness.node.inputs import NodeInputs, load_inputs
from harness.node.topology import Topology, detect_topology, parse_topology
from harness.node.traffic import ModelTraffic, parse_traffic

__all__ = ["Allocation", "Assignment", "CapacityRow", "Candidate", "Demand", "Estimate", "ModelTraffic",
           "NodeConfirmation", "NodeInputs", "NodePlan", "Shape", "Shortfall", "Topology", "allocate", "build_plan",
           "confirm_plan", "detect_topology", "estimate_capacity", "load_inputs", "parse_topology", "parse_traffic",
           "write_node_config"]
