"""On-prem inference appliance: specialist models served locally, audited, measured."""

__version__ = "0.1.0"
