"""``bnctl audit``: train/eval-mode bugs and unhealthy BatchNorm state, as a CI gate.

:mod:`~bnctl.core.registry` holds the checks and flags (codes, severities, documentation),
:mod:`~bnctl.audit.checks` implements them, :mod:`~bnctl.audit.runner` runs them on files,
:mod:`~bnctl.audit.formats` writes text, JSON, SARIF and JUnit.
"""

from ..core.registry import CHECKS, Check
from .runner import AuditConfig, AuditResult, Finding, audit, load_config

__all__ = ["CHECKS", "Check", "AuditConfig", "AuditResult", "Finding", "audit", "load_config"]
