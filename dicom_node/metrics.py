"""Compatibility shim: ``db.metrics`` is the owner (moved to the foundation floor).

Kept only so that branches written against the old path keep importing; new code imports
``db.metrics``.  Remove once nothing imports ``dicom_node.metrics``.
"""

from db.metrics import *  # noqa: F403
