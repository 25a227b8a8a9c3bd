"""Compatibility shim: ``db.errors`` is the owner (moved to the foundation floor).

Kept only so that branches written against the old path keep importing; new code imports
``db.errors``.  Remove once nothing imports ``dicom_node.errors``.
"""

from db.errors import *  # noqa: F403
