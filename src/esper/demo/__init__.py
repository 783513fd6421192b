"""``esper-demo``: watch a small network grow under Weatherlight, through the bus."""

from esper.demo.run import DemoConfig, DemoSummary, run_demo

__all__ = ["DemoConfig", "DemoSummary", "run_demo"]
